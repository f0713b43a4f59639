//! The connect flow.
//!
//! 1. `POST /l/{token}/connect/{platform}` (a form button on the landing page): checks the link,
//!    refuses cross-site posts (by `Sec-Fetch-Site` and `Origin` where the browser sends them,
//!    and always by the form's hidden token, a hash of the browser-binding cookie the landing page
//!    set), creates a single-use flow (random `state` of 256 bits, PKCE
//!    verifier, both stored server-side, the state only as a hash), binds it to this browser with
//!    an HttpOnly SameSite=Lax cookie, and answers 303 to the provider's authorization page.
//! 2. `GET /oauth/{provider}/callback`: the one fixed redirect URI per provider. Checks the state
//!    (known, unexpired, unused, same provider, same browser) *before* any code exchange, then
//!    exchanges the code, fetches the profile, checks the granted scopes, seals the tokens and
//!    upserts the connection. Then 303 to a clean result URL without `code` or `state`.
//! 3. `GET /connected/{flow}`: the success or failure page, shown only to the browser that ran
//!    the flow.
//!
//! A failed attempt writes no connection and no token.

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::{Brand, ConnectedAccount, MessagePage, monogram, platform_from_path, render, service_error_page};
use crate::crypto::{self, Aad};
use crate::db::links::LinkRow;
use crate::db::oauth_flows::FlowRow;
use crate::db::{self, new_id};
use crate::domain::{self, Platform};
use crate::providers::{AuthorizeRequest, ProviderError, pkce};
use crate::service::ServiceResult;
use crate::service::connections::{self, ConnectionStatus, Upserted};
use crate::service::links::{self, LinkStatus, Resolved};
use crate::state::AppState;

/// How long a started flow stays valid.
const FLOW_LIFETIME_MS: i64 = 10 * 60 * 1000;

/// The browser-binding cookie's name: `__Host-` prefixed (which requires `Secure`) on https.
fn cookie_name(state: &AppState) -> &'static str {
    if state.config.is_https() { "__Host-authlink_flow" } else { "authlink_flow" }
}

/// The value of the cookie `name`, as the browser sent it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn read_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    cookie(headers, name).filter(|v| links::token_well_formed(v))
}

/// The name of the cookie that names this browser's latest flow of `platform`.
fn last_flow_cookie_name(state: &AppState, platform: Platform) -> String {
    last_flow_cookie_name_of(state.config.is_https(), platform)
}

/// [`last_flow_cookie_name`] where the public URL is https (`https`) or not.
fn last_flow_cookie_name_of(https: bool, platform: Platform) -> String {
    let prefix = if https { "__Host-" } else { "" };
    format!("{prefix}authlink_last_{}", platform.as_str())
}

/// The answer to a callback (`path` is `/oauth/{provider}/callback`) that was cut short: its
/// handler ran past the request timeout (`panicked` false) or panicked. As on every other way
/// out of the callback, a 303 to the failure page, so that the code and the state leave the
/// address bar; the page leads this browser back to the link of its latest flow, if it has one.
/// `None` for any other path. `https`: whether the public URL is https.
pub fn callback_cut_short(https: bool, path: &str, headers: &HeaderMap, panicked: bool) -> Option<Response> {
    let provider = path.strip_prefix("/oauth/")?.strip_suffix("/callback")?;
    let platform = platform_from_path(provider)?;
    let flow = cookie(headers, &last_flow_cookie_name_of(https, platform)).filter(|v| db::is_id(v));
    let failure = if panicked { Failure::Internal } else { Failure::Unavailable };
    Some(refused(failure, platform, flow))
}

/// The `Set-Cookie` naming `flow_id` as this browser's latest flow of `platform`, for as long as
/// the flow lives. Whether a provider sends `state` back with an error is undocumented; without
/// it, this cookie is how the error page finds the link to try again from. A flow id is no
/// secret: the page offers the flow's link only to the browser the flow is bound to.
fn set_last_flow_cookie(state: &AppState, platform: Platform, flow_id: &str) -> HeaderValue {
    let secure = if state.config.is_https() { "; Secure" } else { "" };
    let cookie = format!(
        "{}={flow_id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        last_flow_cookie_name(state, platform),
        FLOW_LIFETIME_MS / 1000
    );
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The flow id the latest-flow cookie of `platform` names, if it is well formed.
fn last_flow(state: &AppState, headers: &HeaderMap, platform: Platform) -> Option<String> {
    cookie(headers, &last_flow_cookie_name(state, platform)).filter(|v| db::is_id(v)).map(str::to_string)
}

/// Whether the request carries the browser-binding cookie whose hash is `expected_hash`.
fn same_browser(state: &AppState, headers: &HeaderMap, expected_hash: &str) -> bool {
    read_cookie(headers, cookie_name(state))
        .map(|v| {
            crypto::constant_time_eq(crypto::sha256_hex(v.as_bytes()).as_bytes(), expected_hash.as_bytes())
        })
        .unwrap_or(false)
}

fn set_cookie(state: &AppState, value: &str) -> HeaderValue {
    let secure = if state.config.is_https() { "; Secure" } else { "" };
    let cookie =
        format!("{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age=86400{secure}", cookie_name(state));
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// This browser's binding cookie, and the `Set-Cookie` that sets it anew (a new value when the
/// browser brought none, else the same value for another day, so that a client who comes back
/// the next day through the same link is not turned away half-way).
pub(super) fn browser_cookie(state: &AppState, headers: &HeaderMap) -> (String, HeaderValue) {
    let value = read_cookie(headers, cookie_name(state)).map_or_else(crypto::random_token, str::to_string);
    let header = set_cookie(state, &value);
    (value, header)
}

/// The value of the start forms' hidden `form` field for the browser whose cookie is `browser`:
/// a hash of the cookie, which another site can neither read nor compute. A start without it
/// (a post from another site, which also cannot make the browser send a `SameSite=Lax` cookie
/// with a cross-site post) is refused, whatever the browser says or does not say about origins.
pub(super) fn form_token(browser: &str) -> String {
    crypto::sha256_hex(format!("authlink start form\0{browser}").as_bytes())
}

/// The start form's fields.
#[derive(Deserialize)]
pub struct StartForm {
    /// [`form_token`] of this browser's cookie.
    form: String,
}
redacted_debug!(StartForm, shown: [], hidden: [form]);

/// Whether a POST comes from our own pages. Browsers send `Origin` on POSTs and
/// `Sec-Fetch-Site` on all requests; either naming another site means a cross-site post.
fn is_same_origin_post(state: &AppState, headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // Under `Referrer-Policy: no-referrer` (our pages) browsers send `Origin: null` even for
        // same-origin form posts: the form token decides then.
        None | Some("null") => true,
        Some(origin) => origin == state.config.public_url.origin().ascii_serialization(),
    }
}

/// Whether the start form's token matches the cookie this browser brought.
fn form_matches(state: &AppState, headers: &HeaderMap, form: Option<&StartForm>) -> bool {
    match (read_cookie(headers, cookie_name(state)), form) {
        (Some(browser), Some(form)) => {
            crypto::constant_time_eq(form_token(browser).as_bytes(), form.form.as_bytes())
        }
        _ => false,
    }
}

/// `POST /l/{token}/connect/{platform}`.
pub async fn start_connect(
    State(state): State<AppState>,
    Path((token, platform)): Path<(String, String)>,
    headers: HeaderMap,
    form: Result<axum::Form<StartForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !is_same_origin_post(&state, &headers) {
        tracing::warn!("cross-site connect request refused");
        return render(
            StatusCode::FORBIDDEN,
            &MessagePage::new(
                "Request refused",
                "This request did not come from this site. Nothing was connected.",
            )
            .next("Press Try again to open the link's page, then press the button there.")
            .retry(format!("/l/{token}")),
        );
    }
    if !form_matches(&state, &headers, form.as_ref().ok().map(|f| &f.0)) {
        // Another site's post, or a browser that did not keep the landing page's cookie.
        tracing::warn!("connect request without this browser's form token refused");
        return render(
            StatusCode::FORBIDDEN,
            &MessagePage::new(
                "Please open the link again",
                "The page was open for a long time, or your browser did not keep what it needs to start safely. Nothing was connected.",
            )
            .next("Press Try again. If this page comes back, open the link in your phone's usual browser (such as Safari or Chrome) and allow cookies for this site.")
            .retry(format!("/l/{token}")),
        );
    }
    let (link, workspace) = match links::resolve(&state, &token).await {
        Err(e) => return super::service_error_page_back_to(e, Some(format!("/l/{token}"))),
        Ok(Resolved::Unknown) => return super::link_not_found(),
        Ok(Resolved::Gone { status, workspace }) => return super::link_gone(status, &*workspace),
        Ok(Resolved::Usable { link, workspace, .. }) => (link, workspace),
    };
    let landing = format!("/l/{token}");
    let offered = domain::platforms_from_db(&link.platforms);
    let Some((platform, provider)) = platform_from_path(&platform)
        .filter(|p| offered.contains(p))
        .and_then(|p| state.providers.get(p).map(|prov| (p, prov)))
    else {
        return render(
            StatusCode::NOT_FOUND,
            &MessagePage::new("Platform not offered", "This link does not offer that platform.")
                .next("Go back to the link's page and choose one of the platforms shown there.")
                .retry(landing)
                .branded(&*workspace),
        );
    };

    let (browser_value, cookie) = browser_cookie(&state, &headers);
    let oauth_state = crypto::random_token();
    // No verifier for a provider without PKCE: none is made, and the attempt keeps none (an
    // empty sealed value is an erased one).
    let verifier = provider.uses_pkce().then(pkce::new_verifier);
    let now = state.now_ms();
    let id = new_id();
    let flow = FlowRow {
        verifier_sealed: verifier.as_deref().map_or_else(String::new, |v| {
            state.keys.seal_str(v, Aad::new(&workspace.id, "oauth_flows", &id, "verifier"))
        }),
        id,
        state_hash: crypto::sha256_hex(oauth_state.as_bytes()),
        browser_hash: crypto::sha256_hex(browser_value.as_bytes()),
        link_id: link.id.clone(),
        workspace_id: workspace.id.clone(),
        provider: platform.as_str().into(),
        created_at: now,
        expires_at: now + FLOW_LIFETIME_MS,
        consumed_at: None,
        outcome: None,
        connection_id: None,
        detail: None,
        link_token_hash: Some(link.token_hash.clone()),
    };
    let flow_id = flow.id.clone();
    let open_limit = i64::from(state.config.http.link_open_attempts);
    match state.db.write_flow(db::oauth_flows::Insert { flow, open_limit }).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(link_id = %link.id, provider = %platform, open_limit,
                "connect flow refused: the link has as many attempts open as http.link_open_attempts allows");
            metrics::counter!("authlink_connect_flows_refused_total", "provider" => platform.as_str())
                .increment(1);
            return link_busy(&landing, &*workspace);
        }
        Err(e) => return super::service_error_page_back_to(e.into(), Some(landing)),
    }
    let redirect_uri = redirect_uri(&state, platform);
    let url = provider.authorize_url(&AuthorizeRequest {
        state: &oauth_state,
        code_verifier: verifier.as_deref().unwrap_or_default(),
        redirect_uri: &redirect_uri,
    });
    tracing::info!(%flow_id, link_id = %link.id, provider = %platform, "connect flow started");
    metrics::counter!("authlink_connect_flows_started_total", "provider" => platform.as_str()).increment(1);
    let mut res = Redirect::to(url.as_str()).into_response();
    res.headers_mut().insert(header::SET_COOKIE, cookie);
    res.headers_mut().append(header::SET_COOKIE, set_last_flow_cookie(&state, platform, &flow_id));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The 429 page of a start refused because its link has as many attempts open as
/// `http.link_open_attempts` allows: they end within ten minutes.
fn link_busy<'a>(landing: &str, brand: impl Into<Brand<'a>>) -> Response {
    let w = brand.into();
    let page = MessagePage::new(
        "This link is busy",
        "Many connections were started through this link in the last few minutes and have not finished yet. \
         Nothing was connected.",
    )
    .next(format!(
        "Wait a few minutes, then press Try again. If this page comes back, ask {} to send you a new link.",
        w.name
    ))
    .retry(landing.to_owned())
    .branded(w);
    let mut res = render(StatusCode::TOO_MANY_REQUESTS, &page);
    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("300"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The exact redirect URI registered with the provider.
pub fn redirect_uri(state: &AppState, platform: Platform) -> String {
    state.config.public(&format!("/oauth/{}/callback", platform.as_str()))
}

/// The query of a provider callback. Every field is optional: providers omit what they like.
#[derive(Default, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    error_reason: Option<String>,
    /// TikTok: the scopes the user actually granted.
    scopes: Option<String>,
    /// RFC 9207 issuer; neither provider sends it today.
    iss: Option<String>,
}
redacted_debug!(CallbackQuery, shown: [error, error_description, error_reason, scopes, iss], hidden: [code, state]);

/// Why a callback failed, each with its page and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    StateMissing,
    StateUnknown,
    StateExpired,
    StateReused,
    OtherBrowser,
    WrongProvider,
    Denied,
    ProviderError,
    LinkGone,
    LinkUsedUp,
    ExchangeFailed,
    ProfileFailed,
    ProviderUnavailable,
    /// The provider reported a passing problem of its own (`server_error`,
    /// `temporarily_unavailable`) instead of a consent screen.
    ProviderBusy,
    /// The provider refused authlink's own authorization request (its client key, its scopes or
    /// the callback URL registered with it) and said so to the callback. Only the operator can
    /// cure it.
    SetupError,
    /// The provider refused the code exchange for the app's credentials or redirect URI. Only
    /// the operator can cure it.
    ExchangeRefused,
    ScopesMissing,
    AccountNotAllowed,
    /// Too many requests from the client's address (the link pages' rate limit).
    RateLimited,
    /// authlink's database could not be reached.
    Unavailable,
    /// An internal error of authlink's.
    Internal,
}

impl Failure {
    fn code(self) -> &'static str {
        match self {
            Failure::StateMissing => "state_missing",
            Failure::StateUnknown => "state_unknown",
            Failure::StateExpired => "state_expired",
            Failure::StateReused => "state_reused",
            Failure::OtherBrowser => "other_browser",
            Failure::WrongProvider => "wrong_provider",
            Failure::Denied => "denied",
            Failure::ProviderError => "provider_error",
            Failure::LinkGone => "link_gone",
            Failure::LinkUsedUp => "link_used_up",
            Failure::ExchangeFailed => "exchange_failed",
            Failure::ProfileFailed => "profile_failed",
            Failure::ProviderUnavailable => "provider_unavailable",
            Failure::ProviderBusy => "provider_busy",
            Failure::SetupError => "setup_error",
            Failure::ExchangeRefused => "exchange_refused",
            Failure::ScopesMissing => "scopes_missing",
            Failure::AccountNotAllowed => "account_not_allowed",
            Failure::RateLimited => "rate_limited",
            Failure::Unavailable => "unavailable",
            Failure::Internal => "internal",
        }
    }

    fn from_code(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.code() == s)
    }

    /// Every failure.
    const ALL: [Failure; 21] = [
        Failure::StateMissing,
        Failure::StateUnknown,
        Failure::StateExpired,
        Failure::StateReused,
        Failure::OtherBrowser,
        Failure::WrongProvider,
        Failure::Denied,
        Failure::ProviderError,
        Failure::LinkGone,
        Failure::LinkUsedUp,
        Failure::ExchangeFailed,
        Failure::ProfileFailed,
        Failure::ProviderUnavailable,
        Failure::ProviderBusy,
        Failure::SetupError,
        Failure::ExchangeRefused,
        Failure::ScopesMissing,
        Failure::AccountNotAllowed,
        Failure::RateLimited,
        Failure::Unavailable,
        Failure::Internal,
    ];

    /// Whether trying again from the link can help: not once the link is gone or used up (its
    /// page could not connect this account; the page says to ask for a new link), nor while
    /// the provider refuses the service's own setup (the page says to tell the agency).
    fn retryable(self) -> bool {
        !matches!(
            self,
            Failure::LinkGone | Failure::LinkUsedUp | Failure::SetupError | Failure::ExchangeRefused
        )
    }

    /// Offers "Try again" to `landing` (the link's page) on `page`, when trying again can help
    /// and the page is there: its next step then points at the button instead of at "the link
    /// you were sent".
    fn offer_try_again(self, page: &mut MessagePage, platform: &str, landing: Option<String>) {
        let Some(href) = landing.filter(|_| self.retryable()) else { return };
        let next = match self {
            Failure::StateExpired | Failure::StateReused | Failure::WrongProvider => {
                Some(format!("Press Try again, then choose {platform} once more."))
            }
            Failure::Denied => {
                Some(format!("If this was a mistake, press Try again, choose {platform}, then choose Allow."))
            }
            Failure::ScopesMissing => {
                Some(format!("Press Try again, choose {platform}, and leave the permissions switched on."))
            }
            Failure::RateLimited => Some("Please wait a minute, then press Try again.".to_owned()),
            _ => None,
        };
        if let Some(next) = next {
            page.next_step = Some(next);
        }
        page.try_again = Some(href);
    }

    /// The failure an `error` the provider sent back to the callback stands for (RFC 6749
    /// §4.1.2.1, the values TikTok documents, providers.md §2.2).
    fn of_callback_error(error: &str) -> Self {
        match error {
            "access_denied" => Failure::Denied,
            "server_error" | "temporarily_unavailable" => Failure::ProviderBusy,
            "invalid_client"
            | "unauthorized_client"
            | "invalid_scope"
            | "invalid_request"
            | "unsupported_response_type"
            | "unsupported_grant_type" => Failure::SetupError,
            _ => Failure::ProviderError,
        }
    }

    /// `page` with this failure's status (and, when the service is unavailable, the
    /// `Retry-After` of the minute its words ask for).
    fn render(self, page: &MessagePage) -> Response {
        let res = render(self.status(), page);
        if matches!(self, Failure::Unavailable | Failure::RateLimited) {
            super::try_again_in_a_minute(res)
        } else {
            res
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Failure::StateMissing
            | Failure::StateUnknown
            | Failure::StateExpired
            | Failure::StateReused
            | Failure::OtherBrowser
            | Failure::WrongProvider
            // Whatever the provider sent back to the callback is answered with a 4xx (a client
            // can send it all), the passing problems and setup errors it reports included.
            | Failure::ProviderError
            | Failure::ProviderBusy
            | Failure::SetupError => StatusCode::BAD_REQUEST,
            Failure::Denied | Failure::ScopesMissing | Failure::AccountNotAllowed => StatusCode::FORBIDDEN,
            Failure::LinkGone | Failure::LinkUsedUp => StatusCode::GONE,
            Failure::ExchangeFailed | Failure::ProfileFailed | Failure::ExchangeRefused => StatusCode::BAD_GATEWAY,
            Failure::ProviderUnavailable => StatusCode::GATEWAY_TIMEOUT,
            Failure::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The page of this failure at `platform`; `detail` is the attempt's (the scopes switched
    /// off, for [`Failure::ScopesMissing`]).
    fn page(self, platform: &str, detail: Option<&str>) -> MessagePage {
        let (title, message, next) = match self {
            Failure::StateMissing | Failure::StateUnknown => (
                "We could not finish this connection",
                format!("We could not match the answer from {platform} to a connection started in this browser. Nothing was connected."),
                format!("Open the link you were sent again and choose {platform}."),
            ),
            Failure::StateExpired => (
                "This attempt took too long",
                "For your safety, a connection attempt is only valid for ten minutes. Nothing was connected.".to_string(),
                "Start again from the link you were sent.".to_string(),
            ),
            Failure::StateReused => (
                "This attempt was already used",
                "This connection attempt was already completed or cancelled, so it cannot be used again.".to_string(),
                "Start again from the link you were sent.".to_string(),
            ),
            Failure::OtherBrowser => (
                "Please finish in the same browser",
                "This connection was started in another browser or app. For your safety it must be finished in the browser where it started.".to_string(),
                format!("Copy the link from the message you were sent, paste it into the address bar of this browser, and choose {platform} again. If your messaging app opens links inside itself, choose its \"Open in browser\" option first."),
            ),
            Failure::WrongProvider => (
                "Something interrupted this connection",
                format!("The answer did not come from {platform}, where this attempt was started. Nothing was connected."),
                "Start again from the link you were sent.".to_string(),
            ),
            Failure::Denied => (
                "Connection cancelled",
                format!("You chose not to allow access on {platform}. Nothing was connected."),
                "If this was a mistake, start again from the link you were sent and choose Allow.".to_string(),
            ),
            Failure::ProviderError => (
                "The platform reported a problem",
                format!("{platform} could not complete the request. Nothing was connected."),
                "Please try again in a few minutes. If it keeps happening, tell the agency that sent you the link.".to_string(),
            ),
            Failure::LinkGone => (
                "This link no longer works",
                "The link was switched off, replaced or expired while you were connecting. Nothing was connected.".to_string(),
                "Ask the agency that sent it for a new link.".to_string(),
            ),
            Failure::LinkUsedUp => (
                "This link has reached its limit",
                format!("This link has connected as many accounts as the agency allowed. It can still reconnect those accounts, but this {platform} account is not one of them, so it was not connected."),
                "Ask the agency that sent it for a new link to connect this account.".to_string(),
            ),
            Failure::ExchangeFailed | Failure::ProfileFailed => (
                "We could not finish connecting",
                format!("{platform} did not confirm the connection. Nothing was connected."),
                "Please try again. If it keeps failing, tell the agency that sent you the link.".to_string(),
            ),
            Failure::ProviderUnavailable => (
                "The platform is not answering right now",
                format!("{platform} did not answer in time, or said it is too busy. Nothing was connected."),
                "Please try again in a few minutes.".to_string(),
            ),
            Failure::ProviderBusy => (
                "The platform has a passing problem",
                format!("{platform} could not show its consent screen just now. Nothing was connected."),
                "Please try again in a few minutes.".to_string(),
            ),
            Failure::SetupError | Failure::ExchangeRefused => (
                "This connection cannot be made right now",
                format!("{platform} did not accept this connection because of a setting on the agency's side. You did nothing wrong. Nothing was connected."),
                "Please tell the agency that sent you the link. Once they have fixed it, the same link will work.".to_string(),
            ),
            Failure::ScopesMissing => {
                let missing: Vec<String> = detail
                    .map(connections::split_scopes)
                    .unwrap_or_default()
                    .iter()
                    .map(|s| domain::scope_description(s).into_owned())
                    .collect();
                (
                    "Some permissions were not granted",
                    if missing.is_empty() {
                        format!("A permission the agency cannot work without was switched off on {platform}, so nothing was connected.")
                    } else {
                        format!(
                            "{} the agency cannot work without {} switched off on {platform}: {}. Nothing was connected.",
                            if missing.len() == 1 { "A permission" } else { "Permissions" },
                            if missing.len() == 1 { "was" } else { "were" },
                            missing.join("; ")
                        )
                    },
                    "Start again from the link you were sent and leave the permissions switched on.".to_string(),
                )
            }
            Failure::AccountNotAllowed => (
                "This account cannot be connected",
                format!("{platform} reported an account type that cannot be connected."),
                "Only professional (business or creator) accounts can be connected. Switch the account to a professional one in the app, then try again.".to_string(),
            ),
            Failure::RateLimited => (
                "Too many requests",
                format!("Too many requests came from your network in a short time, so we could not finish connecting your {platform} account. Nothing was connected."),
                "Please wait a minute, then open the link you were sent again.".to_string(),
            ),
            Failure::Unavailable | Failure::Internal => (
                "Something went wrong on our side",
                format!("We could not finish connecting your {platform} account. Nothing was connected."),
                "Please try again in a minute.".to_string(),
            ),
        };
        MessagePage::new(title, message).next(next)
    }
}

/// The platform's name when it runs in the sandbox, for the notice on the pages of its attempts.
fn sandbox_of(state: &AppState, platform: Platform) -> Option<&'static str> {
    state.providers.get(platform).filter(|p| p.is_sandbox()).map(|_| platform.display_name())
}

/// Counts a callback's outcome: `connected`, `reconnected` or a failure code.
fn count_flow(platform: Platform, outcome: &'static str) {
    metrics::counter!("authlink_connect_flows_total", "provider" => platform.as_str(), "outcome" => outcome)
        .increment(1);
}

/// A callback refused before any code exchange: logged and counted here, then a 303 to a clean
/// URL (without the callback's `code` and `state`, which would stay in the address bar and the
/// history) whose page says why. `flow` is the flow the state belonged to, if any: its page
/// offers a way back to the link, to that flow's browser only.
fn refused(f: Failure, platform: Platform, flow: Option<&str>) -> Response {
    tracing::info!(provider = %platform, failure = f.code(), "connect flow failed");
    count_flow(platform, f.code());
    let mut to = format!("/oauth/{}/failed?reason={}", platform.as_str(), f.code());
    if let Some(id) = flow {
        to.push_str("&flow=");
        to.push_str(id);
    }
    leave_the_callback(&to)
}

/// A 303 from a callback to `to`, kept by no cache: the callback's `code` and `state` leave the
/// address bar and the history.
fn leave_the_callback(to: &str) -> Response {
    let mut res = Redirect::to(to).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A callback the link pages' rate limit refused, before anything else: its own page says to
/// wait.
pub fn rate_limited_callback(platform: Platform) -> Response {
    refused(Failure::RateLimited, platform, None)
}

/// [`refused`] for an error of authlink's own (its database unreachable, an internal error), so
/// that the code and the state leave the address bar as on every other way out of the callback.
fn service_refusal(e: crate::service::ServiceError, platform: Platform, flow: Option<String>) -> Response {
    let f = match e {
        crate::service::ServiceError::Db(db::DbError::Unavailable(e)) => {
            tracing::error!(error = %e, "database unavailable at the callback");
            Failure::Unavailable
        }
        // The link or its workspace went while the client was at the provider.
        crate::service::ServiceError::NotFound(what) => {
            tracing::info!(missing = what, "the flow's link or workspace is gone");
            Failure::LinkGone
        }
        // Another writer changed the connection meanwhile: trying again works.
        crate::service::ServiceError::Conflict(why) => {
            tracing::warn!(reason = %why, "connect flow conflicted with another change");
            Failure::Unavailable
        }
        other => {
            tracing::error!(error = %other, "internal error at the callback");
            Failure::Internal
        }
    };
    refused(f, platform, flow.as_deref())
}

/// The query of [`show_refusal`].
#[derive(Debug, Deserialize)]
pub struct RefusalQuery {
    reason: Option<String>,
    flow: Option<String>,
}

/// `GET /oauth/{provider}/failed`: the page of a refused callback (see `refused`), with its
/// failure's status. Writes nothing.
pub async fn show_refusal(
    State(state): State<AppState>,
    Path(provider_name): Path<String>,
    query: Result<Query<RefusalQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    // A query that does not read (a parameter twice, say) is no page of ours either.
    let Ok(Query(q)) = query else { return super::not_found().await };
    let reason = q.reason.as_deref().and_then(Failure::from_code);
    let (Some(platform), Some(f)) = (platform_from_path(&provider_name), reason) else {
        return super::not_found().await;
    };
    let mut page = f.page(platform.display_name(), None);
    if let Some(id) = q.flow.as_deref().filter(|id| db::is_id(id)) {
        let flow = async {
            let mut conn = state.db.read_fast().await?;
            let Some(flow) = db::oauth_flows::get(&mut conn, id).await? else { return Ok(None) };
            // The attempt's own browser only: to anyone else with the address the page is as
            // if no attempt were named (it tells them no agency, and no way back to a link).
            if !same_browser(&state, &headers, &flow.browser_hash) {
                return Ok(None);
            }
            let workspace = db::workspaces::get(&mut conn, &flow.workspace_id).await?;
            Ok::<_, crate::db::DbError>(Some((flow, workspace)))
        }
        .await;
        match flow {
            Ok(Some((flow, workspace))) => {
                page.attempt = Some(crate::service::attempts::reference(&flow.id));
                page.sandbox = sandbox_of(&state, platform);
                if f.retryable() {
                    let landing = landing_href(&state, &flow).await;
                    f.offer_try_again(&mut page, platform.display_name(), landing);
                }
                // Branded as the link's pages were, so that the client is not left wondering
                // whose page this is halfway through.
                if let Some(w) = &workspace {
                    page = page.branded(w);
                }
            }
            Ok(None) => {}
            Err(e) => return service_error_page(e.into()),
        }
    }
    f.render(&page)
}

/// `GET /oauth/{provider}/callback`.
pub async fn oauth_callback(
    State(state): State<AppState>,
    Path(provider_name): Path<String>,
    query: Result<Query<CallbackQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let started = std::time::Instant::now();
    let Some(platform) = platform_from_path(&provider_name) else {
        return super::not_found().await;
    };
    // An answer that does not read (a parameter twice, say) is not the provider's: no code is
    // exchanged, and the client is told in words, from a clean URL.
    let Ok(Query(q)) = query else {
        return refused(Failure::ProviderError, platform, last_flow(&state, &headers, platform).as_deref());
    };
    let Some(raw_state) = q.state.as_deref().filter(|s| !s.is_empty()) else {
        // Whether the providers send `state` back with an error is not documented: an error
        // without it is still the provider's answer, and the client is told what it says. The
        // way back to the link is this browser's latest flow of the provider. Nothing is
        // written: without the state, the answer may as well come from a page of another site
        // that sent this browser here, and must not end (nor say how ended) an attempt the
        // client is in the middle of. The attempt stays open, and the operator is told of a
        // setup problem only as a possibility.
        let Some(error) = q.error.as_deref() else {
            return refused(Failure::StateMissing, platform, None);
        };
        let f = Failure::of_callback_error(error);
        log_callback_error(platform, &q, error, false);
        let flow = last_flow(&state, &headers, platform);
        // Only in the browser of an attempt still open could this be the provider's answer to
        // it: anyone else's request tells the operator nothing.
        if f == Failure::SetupError && open_flow_of_this_browser(&state, &headers, flow.as_deref()).await {
            tracing::warn!(
                provider = %platform,
                error = ?domain::truncate(error, 64),
                "an error that names a setup problem came back without a state; if the provider sent it, check \
                 the provider's client credentials, the scopes configured for it, and that the callback URL \
                 registered with it is {}",
                redirect_uri(&state, platform)
            );
        }
        return refused(f, platform, flow.as_deref());
    };
    let state_hash = crypto::sha256_hex(raw_state.as_bytes());
    let browser_hash = read_cookie(&headers, cookie_name(&state)).map(|v| crypto::sha256_hex(v.as_bytes()));
    let now = state.now_ms();
    // The common case in one statement: the state is known, unused, unexpired, of this provider
    // and of this browser, and is consumed by it. `iss` is checked first: neither provider sends
    // it, so one that does is not the provider we talk to, and its state stays unused.
    let mut db_time = std::time::Duration::ZERO;
    let claimed = match (&browser_hash, q.iss.is_some()) {
        (Some(browser_hash), false) => {
            let claim = db::oauth_flows::Claim {
                state_hash: state_hash.clone(),
                browser_hash: browser_hash.clone(),
                provider: platform.as_str(),
                now_ms: now,
            };
            let call = std::time::Instant::now();
            let claimed = state.db.write_flow(claim).await;
            db_time = call.elapsed();
            match claimed {
                Ok(flow) => flow,
                Err(e) => return service_refusal(e.into(), platform, last_flow(&state, &headers, platform)),
            }
        }
        _ => None,
    };
    let Some(flow) = claimed else {
        return callback_refused(&state, platform, &state_hash, &headers, q.iss.is_some(), now).await;
    };

    // The provider's calls (three for Instagram, each with its own timeout) end before the
    // request's own timeout would cut the answer off, keeping time for the database: the client
    // gets the "platform did not answer" page, not a bare error.
    let request_timeout = std::time::Duration::from_secs(state.config.http.request_timeout_secs);
    let reserve = (request_timeout / 3).min(std::time::Duration::from_secs(5));
    let deadline = tokio::time::Instant::from_std(started) + request_timeout.saturating_sub(reserve);
    // The attempt ends even if the request does not: a browser that goes away meanwhile (a
    // second tap on Allow cancels the first navigation) does not cut it short after the provider
    // may have spent the code and issued tokens. Its outcome is recorded all the same, and its
    // result page shows it.
    let flow_id = flow.id.clone();
    let ended = {
        let st = state.clone();
        state
            .to_the_end(async move {
                let mut timing = Timing { provider: std::time::Duration::ZERO, db: db_time };
                let outcome = complete_flow(&st, &flow, platform, &q, deadline, &mut timing).await;
                let recorded = match &outcome {
                    // Recorded with the connection, in its transaction.
                    Ok(_) => Ok(()),
                    Err(FlowError::Failed(f, detail)) => {
                        let finish = db::oauth_flows::Finish {
                            id: flow.id.clone(),
                            outcome: f.code(),
                            detail: detail.clone(),
                        };
                        st.db.write_flow(finish).await
                    }
                    Err(FlowError::Service(_)) => {
                        // At best: so that its result page says it failed, rather than that it
                        // is still being completed.
                        let finish = db::oauth_flows::Finish {
                            id: flow.id.clone(),
                            outcome: Failure::Internal.code(),
                            detail: None,
                        };
                        let _ = st.db.write_flow(finish).await;
                        Ok(())
                    }
                };
                (outcome, recorded, timing)
            })
            .await
    };
    let (outcome, recorded, timing) = ended;
    match outcome {
        Ok((_, upserted)) => count_flow(
            platform,
            match upserted {
                Upserted::Created => "connected",
                Upserted::Reconnected => "reconnected",
            },
        ),
        Err(FlowError::Failed(f, _)) => {
            count_flow(platform, f.code());
            if let Err(e) = recorded {
                return service_refusal(e.into(), platform, Some(flow_id));
            }
        }
        Err(FlowError::Service(e)) => {
            count_flow(platform, "internal_error");
            tracing::error!(error = %e, %flow_id, "connect flow failed internally");
            return service_refusal(e, platform, Some(flow_id));
        }
    }
    // A clean URL: the code and state leave the address bar and the history.
    let mut res = leave_the_callback(&format!("/connected/{flow_id}"));
    // How long the provider took, how long our own work took and the database's part of it, for the
    // benchmark harness and for operators looking at slow connections in the developer tools.
    let app_time = started.elapsed().saturating_sub(timing.provider);
    let timing = format!(
        "provider;dur={:.3}, app;dur={:.3}, db;dur={:.3}",
        timing.provider.as_secs_f64() * 1000.0,
        app_time.as_secs_f64() * 1000.0,
        timing.db.as_secs_f64() * 1000.0
    );
    if let Ok(v) = HeaderValue::from_str(&timing) {
        res.headers_mut().insert("server-timing", v);
    }
    res
}

/// The callback's state was not claimed: reads the flow (if any) to tell the client why, in the
/// order of the checks (unknown, other provider or `iss`, other browser, expired, used). No code
/// exchange happens and nothing is written.
async fn callback_refused(
    state: &AppState,
    platform: Platform,
    state_hash: &str,
    headers: &HeaderMap,
    iss_present: bool,
    now: i64,
) -> Response {
    let flow = async {
        let mut conn = state.db.read().await?;
        db::oauth_flows::get_by_state_hash(&mut conn, state_hash).await
    }
    .await;
    let flow = match flow {
        Ok(Some(f)) => f,
        Ok(None) => return refused(Failure::StateUnknown, platform, None),
        Err(e) => return service_refusal(e.into(), platform, last_flow(state, headers, platform)),
    };
    // The flow is known: the failure page leads its browser back to its link.
    let failure = if flow.provider != platform.as_str() || iss_present {
        // Mix-up defence: the answer arrived at another provider's callback.
        Failure::WrongProvider
    } else if !same_browser(state, headers, &flow.browser_hash) {
        Failure::OtherBrowser
    } else if flow.consumed_at.is_some() {
        // The answer came back again to the browser that already used it (a second tap on
        // Allow, Back into the provider's page): that browser is shown how its attempt ended,
        // or that it is still ending, instead of being told to start again.
        tracing::info!(provider = %platform, "an answer already used came back to its browser: shown its result");
        return leave_the_callback(&format!("/connected/{}", flow.id));
    } else if flow.expires_at <= now {
        Failure::StateExpired
    } else {
        Failure::StateReused
    };
    // The page names the platform where the attempt started (a mixed-up answer arrived at
    // another one's address).
    let started_at = flow.provider.parse().unwrap_or(platform);
    refused(failure, started_at, Some(&flow.id))
}

/// Where a callback's time went, for its `Server-Timing` header: waiting for the provider, and
/// the database's part of the rest (its reads and writes, waiting for the write permit included).
struct Timing {
    provider: std::time::Duration,
    db: std::time::Duration,
}

enum FlowError {
    /// The attempt failed, with what went wrong (see [`db::oauth_flows::FlowRow::detail`]).
    Failed(Failure, Option<String>),
    Service(crate::service::ServiceError),
}

impl From<crate::service::ServiceError> for FlowError {
    fn from(e: crate::service::ServiceError) -> Self {
        FlowError::Service(e)
    }
}

/// Logs the `error` (with its reason and description) that came back to the callback, with the
/// attempt's state or without. Written quoted and escaped (`?`): these come from the address
/// bar, and a line break in them must not start a line of its own in a plain-text log.
fn log_callback_error(platform: Platform, q: &CallbackQuery, error: &str, with_state: bool) {
    let reason = domain::truncate(q.error_reason.as_deref().unwrap_or(""), 64);
    let description = domain::truncate(q.error_description.as_deref().unwrap_or(""), 200);
    let error = domain::truncate(error, 64);
    if with_state {
        tracing::info!(provider = %platform, ?error, ?reason, ?description, "provider returned an error to the callback");
    } else {
        tracing::info!(provider = %platform, ?error, ?reason, ?description, "an error came back to the callback without a state");
    }
}

/// Whether `flow` is an attempt of this browser that is still open (unused, unexpired).
async fn open_flow_of_this_browser(state: &AppState, headers: &HeaderMap, flow: Option<&str>) -> bool {
    let Some(id) = flow else { return false };
    let found = async {
        let mut conn = state.db.read_fast().await?;
        db::oauth_flows::get(&mut conn, id).await
    }
    .await;
    match found {
        Ok(Some(f)) => {
            f.consumed_at.is_none()
                && f.expires_at > state.now_ms()
                && same_browser(state, headers, &f.browser_hash)
        }
        _ => false,
    }
}

/// The `error` a provider sent back, as the agency's record of the attempt names it: only a word
/// of RFC 6749's shape (a client can put anything into its address bar), and not for a denial,
/// which says it all.
fn error_word(failure: Failure, error: &str) -> Option<String> {
    Some(error)
        .filter(|e| {
            failure != Failure::Denied
                && !e.is_empty()
                && e.len() <= 40
                && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .map(str::to_string)
}

/// Tells the operator that the provider refused the authorization request itself: a setup
/// problem every client of every link meets until it is fixed.
fn log_refused_authorization(state: &AppState, platform: Platform, error: &str) {
    tracing::error!(
        provider = %platform,
        error = ?domain::truncate(error, 64),
        "the provider refused the authorization request: check the provider's client credentials, the scopes \
         configured for it, and that the callback URL registered with it is {}",
        redirect_uri(state, platform)
    );
}

fn classify(e: &ProviderError, stage: Failure) -> Failure {
    match e {
        ProviderError::Transient { .. } => Failure::ProviderUnavailable,
        ProviderError::Scope { .. } => Failure::ScopesMissing,
        _ => stage,
    }
}

async fn complete_flow(
    state: &AppState,
    flow: &FlowRow,
    platform: Platform,
    q: &CallbackQuery,
    deadline: tokio::time::Instant,
    timing: &mut Timing,
) -> Result<(String, Upserted), FlowError> {
    let past_deadline = || {
        tracing::warn!(provider = %platform, "the provider's calls did not end before the callback's deadline");
        FlowError::Failed(Failure::ProviderUnavailable, None)
    };
    if let Some(error) = q.error.as_deref() {
        log_callback_error(platform, q, error, true);
        let failure = Failure::of_callback_error(error);
        if failure == Failure::SetupError {
            log_refused_authorization(state, platform, error);
        }
        return Err(FlowError::Failed(failure, error_word(failure, error)));
    }
    let Some(code) = q.code.as_deref().filter(|c| !c.is_empty()) else {
        return Err(FlowError::Failed(Failure::ProviderError, None));
    };
    // The link must still be usable when the client comes back.
    let call = std::time::Instant::now();
    let link = {
        let mut conn = state.db.read_fast().await.map_err(crate::service::ServiceError::from)?;
        db::links::get(&mut conn, &flow.link_id).await.map_err(crate::service::ServiceError::from)?
    };
    timing.db += call.elapsed();
    let Some(link) = link else { return Err(FlowError::Failed(Failure::LinkGone, None)) };
    // A used-up link goes on: it may be repairing one of its own accounts, which only the
    // connection's transaction can tell once the account is known.
    // Nor rotated since the flow started: the old URL, and what was started with it, are dead.
    if !matches!(LinkStatus::of(&link, state.now_ms()), LinkStatus::Active | LinkStatus::UsedUp)
        || flow.start().rotated_since(&link)
    {
        return Err(FlowError::Failed(Failure::LinkGone, None));
    }
    let Some(provider) = state.providers.get(platform) else {
        return Err(FlowError::Failed(Failure::ProviderError, None));
    };
    let verifier = if provider.uses_pkce() {
        state
            .keys
            .open_str(
                &flow.verifier_sealed,
                Aad::new(&flow.workspace_id, "oauth_flows", &flow.id, "verifier"),
            )
            .map_err(crate::service::ServiceError::from)?
    } else {
        secrecy::SecretString::from(String::new())
    };
    let redirect = redirect_uri(state, platform);
    let call = std::time::Instant::now();
    let tokens = tokio::time::timeout_at(
        deadline,
        provider.exchange_code(code, verifier.expose_secret(), &redirect, state.now()),
    )
    .await
    .map_err(|_| past_deadline())?;
    timing.provider += call.elapsed();
    let tokens = tokens.map_err(|e| {
        if matches!(e, ProviderError::Misconfigured { .. }) {
            // Not the client's doing and not passing: a wrong client secret, or a callback URL
            // the provider does not know. The operator must act.
            tracing::error!(
                provider = %platform,
                error = %e,
                "the provider refused the code exchange: check the provider's client credentials and that \
                 the callback URL registered with it is {redirect}"
            );
        } else if matches!(e, ProviderError::Rejected { .. }) {
            // A PKCE mismatch (a code not issued for this flow's browser), an answer that does
            // not read: worth a look if it keeps happening.
            tracing::warn!(provider = %platform, error = %e, "the provider refused the code exchange for this attempt");
        } else {
            tracing::warn!(provider = %platform, error = %e, "code exchange failed");
        }
        // Refused credentials or callback URL are the operator's to fix: trying again changes
        // nothing. Any other refusal (a PKCE mismatch, an answer that does not read) may pass.
        let failure = match e {
            ProviderError::Misconfigured { .. } => Failure::ExchangeRefused,
            _ => classify(&e, Failure::ExchangeFailed),
        };
        FlowError::Failed(failure, None)
    })?;
    let granted = granted_scopes(platform, &tokens.scopes, q.scopes.as_deref(), provider.scopes());
    let required = state.config.providers.required_scopes(platform);
    let scope_note = judge_scopes(platform, &granted, &required, provider.scopes())?;
    let call = std::time::Instant::now();
    let profile = tokio::time::timeout_at(deadline, provider.fetch_profile(&tokens.access_token))
        .await
        .map_err(|_| past_deadline())?;
    timing.provider += call.elapsed();
    let profile = profile.map_err(|e| {
        tracing::warn!(provider = %platform, error = %e, "profile fetch failed");
        FlowError::Failed(
            match &e {
                ProviderError::Rejected { reason }
                    if reason.starts_with(crate::providers::instagram::PERSONAL_ACCOUNT) =>
                {
                    Failure::AccountNotAllowed
                }
                _ => classify(&e, Failure::ProfileFailed),
            },
            None,
        )
    })?;
    let mut tokens = tokens;
    tokens.scopes = granted;
    let call = std::time::Instant::now();
    let stored = connections::upsert_from_flow(
        state,
        connections::FlowResult {
            flow_id: flow.id.clone(),
            link,
            started_at: flow.created_at,
            link_token_hash: flow.link_token_hash.clone(),
            platform,
            profile,
            tokens,
            sandbox: provider.is_sandbox(),
            scope_note,
        },
    )
    .await;
    timing.db += call.elapsed();
    match stored? {
        Ok((row, outcome)) => Ok((row.id, outcome)),
        Err(LinkStatus::UsedUp) => Err(FlowError::Failed(Failure::LinkUsedUp, None)),
        Err(_) => Err(FlowError::Failed(Failure::LinkGone, None)),
    }
}

/// The landing page of a flow's link (unsealing its token), for "try again" and "connect
/// another" on the pages of the flow (see [`landing_href_of`]).
async fn landing_href(state: &AppState, flow: &FlowRow) -> Option<String> {
    let mut conn = state.db.read().await.ok()?;
    let link = db::links::get(&mut conn, &flow.link_id).await.ok()??;
    landing_href_of(state, &link, flow)
}

/// The landing page of `link`, whose token is unsealed for it, on the pages of `flow`: none once
/// the link was rotated since the flow started, so that whoever held the old URL (a leaked one,
/// the reason to rotate) cannot learn the new one from an old flow's pages; none either once the
/// link is revoked or expired, whose page would only say so.
fn landing_href_of(state: &AppState, link: &LinkRow, flow: &FlowRow) -> Option<String> {
    let open = matches!(LinkStatus::of(link, state.now_ms()), LinkStatus::Active | LinkStatus::UsedUp);
    if !open || flow.start().rotated_since(link) {
        return None;
    }
    let token = state
        .keys
        .open_str(&link.token_sealed, crate::service::links::token_aad(&link.workspace_id, &link.id))
        .ok()?;
    Some(format!("/l/{}", token.expose_secret()))
}

#[derive(Template)]
#[template(path = "client/success.html")]
struct SuccessPage {
    workspace_name: String,
    workspace_id: String,
    brand_version: i64,
    /// The path of the workspace's logo copy, if it has one.
    logo: Option<String>,
    platform: &'static str,
    reconnected: bool,
    monogram: String,
    avatar: Option<String>,
    handle: Option<String>,
    display_name: Option<String>,
    grants: Vec<std::borrow::Cow<'static, str>>,
    sandbox: bool,
    landing: Option<String>,
    redirect: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ResultPath {
    attempt: String,
}

/// `GET /connected/{flow}`: the result page, for the browser that ran the flow only.
pub async fn show_result(
    State(state): State<AppState>,
    Path(ResultPath { attempt }): Path<ResultPath>,
    headers: HeaderMap,
) -> Response {
    match result_page(&state, &attempt, &headers).await {
        Ok(res) => res,
        Err(e) => service_error_page(e),
    }
}

async fn result_page(state: &AppState, attempt: &str, headers: &HeaderMap) -> ServiceResult<Response> {
    let not_found = || {
        render(
            StatusCode::NOT_FOUND,
            &MessagePage::new(
                "Nothing to show",
                "This page belongs to a connection attempt made in another browser, or it has expired.",
            )
            .next("Open the link you were sent to see where you stand."),
        )
    };
    if !db::is_id(attempt) {
        return Ok(not_found());
    }
    let mut conn = state.db.read_fast().await?;
    let Some(flow) = db::oauth_flows::get(&mut conn, attempt).await? else { return Ok(not_found()) };
    if !same_browser(state, headers, &flow.browser_hash) {
        return Ok(not_found());
    }
    let platform: Platform =
        flow.provider.parse().map_err(|_| crate::service::ServiceError::NotFound("flow"))?;
    let (link, workspace) = match db::links::get_with_workspace(&mut conn, &flow.link_id).await? {
        Some((l, w)) => (Some(l), Some(w)),
        None => (None, db::workspaces::get(&mut conn, &flow.workspace_id).await?),
    };
    if flow.outcome.is_none() {
        return Ok(unfinished_page(state, &flow, platform, link.as_ref(), workspace.as_ref()));
    }
    let landing = link.as_ref().and_then(|l| landing_href_of(state, l, &flow));
    let outcome = flow.outcome.as_deref().unwrap_or_default();
    if let Some(f) = Failure::from_code(outcome) {
        let mut page = f.page(platform.display_name(), flow.detail.as_deref());
        f.offer_try_again(&mut page, platform.display_name(), landing);
        page.attempt = Some(crate::service::attempts::reference(&flow.id));
        page.sandbox = sandbox_of(state, platform);
        if let Some(w) = &workspace {
            page = page.branded(w);
        }
        return Ok(f.render(&page));
    }
    let (Some(workspace), Some(connection_id)) = (workspace, flow.connection_id.as_deref()) else {
        return Ok(not_found());
    };
    let Some(connection) = db::connections::get(&mut conn, connection_id).await? else {
        return Ok(not_found());
    };
    // The link's redirect, else the workspace's default, checked against the allow-list as it
    // stands now: a URL the workspace has since removed from it is no longer offered.
    let allowed = workspace.allow_list();
    let redirect = link
        .as_ref()
        .and_then(|l| l.redirect_url.as_deref())
        .or(workspace.success_redirect.as_deref())
        .and_then(|u| domain::parse_success_redirect(u, &allowed).ok())
        .map(|mut u| {
            u.query_pairs_mut()
                .append_pair("status", outcome)
                .append_pair("provider", platform.as_str())
                .append_pair("connection_id", &connection.id);
            u.to_string()
        });
    let name = connection.display_name.clone().or_else(|| connection.username.clone()).unwrap_or_default();
    let page = SuccessPage {
        workspace_name: workspace.public_name().to_string(),
        workspace_id: workspace.id.clone(),
        brand_version: workspace.updated_at,
        logo: super::Brand::from(&workspace).logo_path(),
        platform: platform.display_name(),
        reconnected: outcome == "reconnected",
        monogram: monogram(&name),
        avatar: connection.avatar_url.as_ref().map(|_| format!("/connected/{}/avatar", flow.id)),
        handle: connection.username.clone(),
        display_name: connection.display_name.clone(),
        grants: connections::split_scopes(&connection.scopes)
            .iter()
            .map(|s| domain::scope_description(s))
            .collect(),
        sandbox: connection.sandbox != 0,
        // Another account only while the link can connect one (not once used up, revoked or
        // expired: its page would only say so).
        landing: landing.filter(|_| {
            link.as_ref().is_some_and(|l| matches!(LinkStatus::of(l, state.now_ms()), LinkStatus::Active))
        }),
        redirect,
    };
    Ok(render(StatusCode::OK, &page))
}

/// The result page of an attempt without an outcome yet: its callback is still under way (the
/// page looks again by itself), or it was cut short without recording one, which means that
/// nothing was connected (the outcome is written with the connection); or the browser never came
/// back from the provider.
fn unfinished_page(
    state: &AppState,
    flow: &FlowRow,
    platform: Platform,
    link: Option<&LinkRow>,
    workspace: Option<&crate::db::workspaces::WorkspaceRow>,
) -> Response {
    let name = platform.display_name();
    // A callback ends within the request's time limit: past it (and a margin), it never will.
    let callback_window_ms =
        i64::try_from(state.config.http.request_timeout_secs).unwrap_or(i64::MAX / 2_000) * 1_000 + 5_000;
    let still_running =
        flow.consumed_at.is_some_and(|at| state.now_ms() < at.saturating_add(callback_window_ms));
    let mut page = if still_running {
        let mut page = MessagePage::new(
            "Finishing your connection",
            format!("We are still completing the connection of your {name} account."),
        )
        .next("This page checks again by itself in a few seconds.");
        page.try_again = Some(format!("/connected/{}", flow.id));
        page.try_again_label = Some("Check again");
        page
    } else {
        let mut page = MessagePage::new(
            "We could not finish this connection",
            format!("This attempt to connect your {name} account did not finish. Nothing was connected."),
        )
        .next("Start again from the link you were sent.");
        page.try_again = link.and_then(|l| landing_href_of(state, l, flow));
        if page.try_again.is_some() {
            page.next_step = Some(format!("Press Try again, then choose {name} once more."));
        }
        page
    };
    page.attempt = Some(crate::service::attempts::reference(&flow.id));
    page.sandbox = sandbox_of(state, platform);
    if let Some(w) = workspace {
        page = page.branded(w);
    }
    let mut res = render(StatusCode::OK, &page);
    if still_running {
        res.headers_mut().insert(header::REFRESH, HeaderValue::from_static("2"));
    }
    res
}

/// The accounts already connected through a link, for the landing page.
pub async fn accounts_of_link(state: &AppState, link_id: &str) -> ServiceResult<Vec<ConnectedAccount>> {
    let rows = connections::of_link(state, link_id).await?;
    Ok(rows
        .into_iter()
        .map(|c| {
            let platform: Platform = c.provider.parse().unwrap_or(Platform::Tiktok);
            let status = ConnectionStatus::parse(&c.status);
            let (status_class, status_text) = match status {
                ConnectionStatus::Active => ("active", "Connected"),
                ConnectionStatus::Broken => ("broken", "Needs reconnecting"),
                ConnectionStatus::Disconnected => ("disconnected", "Removed by the agency"),
            };
            ConnectedAccount {
                platform: platform.display_name(),
                platform_id: platform.as_str(),
                handle: c
                    .username
                    .as_deref()
                    .map(|u| format!("@{u}"))
                    .or(c.display_name.clone())
                    .unwrap_or_else(|| "account".into()),
                status_class,
                status_text,
                needs_reconnect: status == ConnectionStatus::Broken,
                sandbox: c.sandbox != 0,
            }
        })
        .collect())
}

/// Largest avatar image passed through.
const MAX_AVATAR_BYTES: usize = 512 * 1024;

/// `GET /connected/{flow}/avatar`: the connected account's avatar, fetched by the server from
/// the provider's CDN and served from our origin, so the result page makes no third-party
/// request. Only for the browser that ran the flow; only https images from public addresses.
pub async fn show_avatar(
    State(state): State<AppState>,
    Path(ResultPath { attempt }): Path<ResultPath>,
    headers: HeaderMap,
) -> Response {
    let not_found = || StatusCode::NOT_FOUND.into_response();
    if !db::is_id(&attempt) {
        return not_found();
    }
    let found = async {
        let mut conn = state.db.read().await?;
        let Some(flow) = db::oauth_flows::get(&mut conn, &attempt).await? else { return Ok(None) };
        let Some(cid) = flow.connection_id.clone() else { return Ok(None) };
        let connection = db::connections::get(&mut conn, &cid).await?;
        Ok::<_, crate::db::DbError>(connection.map(|c| (flow, c)))
    }
    .await;
    let Ok(Some((flow, connection))) = found else { return not_found() };
    let browser_ok = same_browser(&state, &headers, &flow.browser_hash);
    let Some(avatar) = connection.avatar_url.filter(|_| browser_ok) else { return not_found() };
    let Ok(url) = url::Url::parse(&avatar) else { return not_found() };
    let sandbox_avatar = url.as_str().starts_with(&state.config.public("/sandbox/"));
    if url.scheme() != "https" && !sandbox_avatar {
        return not_found();
    }
    let client = if sandbox_avatar {
        &state.avatar_clients.sandbox
    } else {
        if let Err(e) = state.webhook_guard.check_literal(&url).await {
            tracing::warn!(error = %e, "a connection's avatar URL is not a public address: not fetched");
            return not_found();
        }
        &state.avatar_clients.provider
    };
    let Ok(res) = client.get(url.as_str()).send().await else { return not_found() };
    if !res.status().is_success() {
        return not_found();
    }
    let claimed = res.headers().get(header::CONTENT_TYPE).cloned();
    let Some(body) = whole_body(res, MAX_AVATAR_BYTES).await else { return not_found() };
    let Some(content_type) = avatar_type(sandbox_avatar, claimed.as_ref().map(HeaderValue::as_bytes), &body)
    else {
        return not_found();
    };
    let mut out = body.into_response();
    out.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    out.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=300"));
    out.headers_mut().insert(
        header::HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    out.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; sandbox; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
        ),
    );
    out
}

/// The type an avatar is served as: the one its bytes show, never the one its answer claims.
/// Only a PNG, JPEG, GIF or WebP image is served (an SVG could carry script; a claimed type
/// list such as `image/png, text/html` could be read as a page), except the sandbox's own
/// avatars, SVG drawings it says are SVG.
fn avatar_type(sandbox: bool, claimed: Option<&[u8]>, body: &[u8]) -> Option<&'static str> {
    if sandbox && claimed.is_some_and(|c| c.starts_with(b"image/svg+xml")) {
        return Some("image/svg+xml");
    }
    match crate::service::logos::check(body) {
        Ok(checked) => Some(checked.content_type),
        Err(why) => {
            tracing::info!(why, "a connection's avatar is not an image that is served");
            None
        }
    }
}

/// The body of `res` if it comes whole and holds at most `max` bytes: a part of an image is not
/// shown (nor kept in the browser's cache).
async fn whole_body(mut res: reqwest::Response, max: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.ok()? {
        body.extend_from_slice(&chunk);
        if body.len() > max {
            return None;
        }
    }
    Some(body)
}

/// Judges the scopes `granted` against those `required` and those `asked` for. Without a
/// required scope the connection is useless: the attempt fails. A scope asked for that the
/// client switched off (TikTok's toggles) leaves a working connection, flagged in its status
/// reason (shown in every listing and sent with the webhook), which this returns, so that the
/// agency can ask for it again.
fn judge_scopes(
    platform: Platform,
    granted: &[String],
    required: &[String],
    asked: &[String],
) -> Result<Option<String>, FlowError> {
    let missing: Vec<&String> = required.iter().filter(|s| !granted.contains(s)).collect();
    if !missing.is_empty() {
        tracing::info!(provider = %platform, ?missing, "client granted fewer scopes than required");
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        return Err(FlowError::Failed(Failure::ScopesMissing, Some(names.join(","))));
    }
    let optional: Vec<&str> =
        asked.iter().map(String::as_str).filter(|s| !granted.iter().any(|g| g == s)).collect();
    Ok((!optional.is_empty()).then(|| {
        tracing::info!(provider = %platform, missing = ?optional, "client switched off optional scopes");
        format!("Granted without {}.", optional.join(", "))
    }))
}

/// The scopes granted: what the token endpoint reports, else what the callback reported (TikTok
/// only: Instagram's callback names none, so a `scopes` there is the address bar's, not the
/// provider's), else the scopes asked for. An answer that names no scope grants those asked for
/// (RFC 6749 §5.1: `scope` may be left out when it is the scope requested); neither documented
/// answer leaves it out, and reading its absence as "nothing granted" would fail every attempt.
fn granted_scopes(
    platform: Platform,
    by_token: &[String],
    by_callback: Option<&str>,
    requested: &[String],
) -> Vec<String> {
    if !by_token.is_empty() {
        return by_token.to_vec();
    }
    let by_callback = by_callback.filter(|_| platform == Platform::Tiktok);
    match by_callback.map(connections::split_scopes) {
        Some(scopes) if !scopes.is_empty() => scopes,
        _ => requested.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    /// The agency's list of a link's attempts describes every way an attempt can end (a code
    /// it does not know would be shown as it is).
    #[test]
    fn every_failure_is_described_to_the_agency() {
        use crate::service::attempts::{AttemptStatus, describe};
        for f in super::Failure::ALL {
            let words = describe(AttemptStatus::Failed, Some(f.code()), None);
            let recorded = !matches!(
                f,
                super::Failure::StateMissing
                    | super::Failure::StateUnknown
                    | super::Failure::StateExpired
                    | super::Failure::StateReused
                    | super::Failure::OtherBrowser
                    | super::Failure::WrongProvider
                    | super::Failure::RateLimited
            );
            // The refusals before the state is claimed are never recorded on an attempt.
            assert_eq!(!words.starts_with("Ended as"), recorded, "{}: {words}", f.code());
            assert_eq!(super::Failure::from_code(f.code()), Some(f));
        }
    }

    /// Each `error` a provider may send back to the callback is read as what it means for the
    /// client: a denial, a passing problem, a setup the operator must fix, or an error.
    #[test]
    fn callback_errors_are_told_apart() {
        use super::Failure;
        let of = Failure::of_callback_error;
        assert_eq!(of("access_denied"), Failure::Denied);
        for e in ["server_error", "temporarily_unavailable"] {
            assert_eq!(of(e), Failure::ProviderBusy, "{e}");
        }
        for e in [
            "invalid_client",
            "unauthorized_client",
            "invalid_scope",
            "invalid_request",
            "unsupported_response_type",
        ] {
            assert_eq!(of(e), Failure::SetupError, "{e}");
            assert!(!Failure::SetupError.retryable() && !Failure::ExchangeRefused.retryable());
        }
        assert_eq!(of("invalid_grant"), Failure::ProviderError);
        assert_eq!(of("something_else"), Failure::ProviderError);
    }

    #[test]
    fn avatars_are_served_as_what_their_bytes_are() {
        // A 1×1 PNG.
        let png: &[u8] = &[
            0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d, b'I', b'H', b'D', b'R', 0, 0, 0,
            1, 0, 0, 0, 1, 8, 6, 0, 0, 0, 0x1f, 0x15, 0xc4, 0x89,
        ];
        let html = b"<html><script>alert(1)</script></html>";
        let svg = b"<svg xmlns='http://www.w3.org/2000/svg'/>";
        let t = super::avatar_type;
        assert_eq!(t(false, Some(b"text/html"), png), Some("image/png"), "the bytes, not the claim");
        assert_eq!(t(false, Some(b"image/png, text/html"), html), None);
        assert_eq!(t(false, Some(b"image/png"), html), None);
        assert_eq!(t(false, Some(b"image/SVG+xml"), svg), None);
        assert_eq!(t(false, Some(b"image/svg+xml"), svg), None, "SVG only from the sandbox");
        assert_eq!(t(true, Some(b"image/svg+xml"), svg), Some("image/svg+xml"));
        assert_eq!(t(true, Some(b"text/html"), html), None);
        assert_eq!(t(true, None, png), Some("image/png"));
    }

    #[test]
    fn granted_scopes_come_from_the_answer_then_the_callback_then_the_request() {
        use crate::domain::Platform;
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let asked = v(&["a", "b", "c"]);
        let granted =
            |a: &[String], b: Option<&str>, c: &[String]| super::granted_scopes(Platform::Tiktok, a, b, c);
        assert_eq!(granted(&v(&["a"]), Some("a,b"), &asked), ["a"], "the token answer first");
        assert_eq!(granted(&[], Some("a, b"), &asked), ["a", "b"], "then the callback's");
        assert_eq!(granted(&[], Some(" , "), &asked), asked, "an empty list reports nothing");
        assert_eq!(granted(&[], None, &asked), asked, "named by neither: as asked");
        // Instagram's callback names no scopes: one added in the address bar is not believed.
        let instagram = super::granted_scopes(Platform::Instagram, &[], Some("a,made_up"), &asked);
        assert_eq!(instagram, asked, "Instagram: as asked, whatever the address bar says");
    }

    /// An image host that answers whole, too long, and cut off (10 of 1,000 bytes, then the
    /// connection closes): only the whole answer is read.
    #[tokio::test]
    async fn only_whole_bodies_are_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/a.png", host.local_addr().unwrap());
        let answers = [(10, 10), (100, 100), (1000, 10)];
        let server = tokio::spawn(async move {
            for (length, sent) in answers {
                let (mut stream, _) = host.accept().await.unwrap();
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await.unwrap();
                let head =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n");
                stream.write_all(head.as_bytes()).await.unwrap();
                stream.write_all(&vec![7u8; sent]).await.unwrap();
            }
        });
        let client = reqwest::Client::new();
        let mut read = Vec::new();
        for _ in answers {
            let res = client.get(&url).send().await.unwrap();
            read.push(super::whole_body(res, 50).await.map(|b| b.len()));
        }
        server.await.unwrap();
        assert_eq!(read, [Some(10), None, None]);
    }

    /// What the callback, the start form, an authorization request and a dashboard form print
    /// with `Debug` (a `?` in a log line, a panic) holds none of their secrets.
    #[test]
    fn secrets_stay_out_of_debug_output() {
        let canary = "CANARY-5e1f";
        let parse = |query: String| -> axum::http::Uri { format!("/?{query}").parse().unwrap() };
        let uri = parse(format!("code={canary}1&state={canary}2&error=access_denied&scopes=user.info.basic"));
        let axum::extract::Query(q) =
            axum::extract::Query::<super::CallbackQuery>::try_from_uri(&uri).unwrap();
        let printed = format!("{q:?}");
        assert!(printed.contains("access_denied") && printed.contains("user.info.basic"), "{printed}");
        let axum::extract::Query(form) =
            axum::extract::Query::<super::StartForm>::try_from_uri(&parse(format!("form={canary}3")))
                .unwrap();
        let request = crate::providers::AuthorizeRequest {
            state: &format!("{canary}4"),
            code_verifier: &format!("{canary}5"),
            redirect_uri: "https://authlink.example/oauth/tiktok/callback",
        };
        let printed = [printed, format!("{form:?}"), format!("{request:?}")].join("\n");
        assert!(printed.contains("/oauth/tiktok/callback") && printed.contains("[redacted]"), "{printed}");
        assert!(!printed.contains(canary), "{printed}");
    }
}
