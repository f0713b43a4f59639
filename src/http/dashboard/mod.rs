//! The dashboard under `/app`: server-rendered pages for agency members and platform admins.
//!
//! - **Sessions**: [`Ctx`](crate::http::dashboard::Ctx) is the extractor of every signed-in
//!   page. It reads the session cookie (`__Host-authlink_session` on https, `authlink_session`
//!   otherwise; HttpOnly, SameSite=Lax), checks the session in the database
//!   ([`users::authenticate`](crate::service::users::authenticate)) and otherwise sends the
//!   browser to the sign-in page with the page it asked for as `next`.
//! - **CSRF**: [`guard_posts`](crate::http::dashboard::guard_posts) runs before every POST
//!   handler. It refuses cross-site posts and requires a `csrf` form field equal to
//!   HMAC-SHA256(session token, fixed label), or, on the sign-in form, the same HMAC of a
//!   pre-sign-in cookie. The token is never stored; a forged or missing one gets a 403 page. It
//!   also parses the form once ([`FormData`](crate::http::dashboard::FormData)), so that handlers
//!   can read repeated fields (checkboxes).
//! - **Access**: platform admins see every workspace; other users only the workspaces they are a
//!   member of. Any other workspace, and any object of another workspace, is "not found" (404),
//!   so that ids do not leak. Owners (and admins) also manage members, branding and API keys.
//! - **Rendering**: askama templates in `templates/dashboard/`, one stylesheet and one small
//!   script served from this module (same origin; the CSP forbids inline code and styles). Every
//!   page works without JavaScript; the script only adds the copy buttons, confirmation dialogs
//!   and the live branding preview.

/// Static assets: stylesheet, script, preview colours.
mod assets;
/// Sign-in, sign-out and password change.
mod auth;
/// The connection list and detail pages.
mod connections;
mod invite;
/// Link pages: list, create, detail, QR code, revoke and rotate.
mod links;
/// Workspace settings: members, branding, API keys.
mod settings;
/// Webhook endpoints and deliveries.
mod webhooks;
/// Workspace switcher, overview, audit log, and the admins' pages.
mod workspaces;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::Sha256;

use crate::db::sessions::SessionRow;
use crate::db::users::UserRow;
use crate::db::workspaces::WorkspaceRow;
use crate::db::{self, DbError};
use crate::domain::FieldError;
use crate::service::users::{self, Role};
use crate::service::{Actor, Scope, ServiceError};
use crate::state::AppState;

/// Rows per page of every list.
const PAGE_SIZE: i64 = 25;

/// The dashboard routes, with the CSRF guard on every POST.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/app", get(workspaces::home))
        .route("/app/static/dashboard.css", get(assets::stylesheet))
        .route("/app/static/dashboard.js", get(assets::script))
        .route("/app/preview/{file}", get(assets::preview_colours))
        .route("/app/login", get(auth::login_form).post(auth::login))
        .route("/app/logout", post(auth::logout))
        .route("/app/account", get(auth::account))
        .route("/app/account/password", post(auth::change_password))
        .route("/app/workspaces", get(workspaces::list).post(workspaces::create))
        .route("/app/search", get(workspaces::search))
        .route("/app/w/{slug}", get(workspaces::overview))
        .route("/app/w/{slug}/audit", get(workspaces::audit_log))
        .route("/app/w/{slug}/links", get(links::list).post(links::create))
        .route("/app/w/{slug}/links/new", get(links::new_form))
        .route("/app/w/{slug}/links/{id}", get(links::show))
        .route("/app/w/{slug}/links/{id}/qr.svg", get(links::qr_code))
        .route("/app/w/{slug}/links/{id}/edit", get(links::edit_form).post(links::edit))
        .route("/app/w/{slug}/links/{id}/revoke", post(links::revoke))
        .route("/app/w/{slug}/links/{id}/rotate", post(links::rotate))
        .route("/app/w/{slug}/connections", get(connections::list))
        .route("/app/w/{slug}/connections/{id}", get(connections::show))
        .route("/app/w/{slug}/connections/{id}/disconnect", post(connections::disconnect))
        .route("/app/w/{slug}/connections/{id}/check", post(connections::check))
        .route("/app/w/{slug}/api-keys", get(settings::api_keys).post(settings::create_api_key))
        .route("/app/w/{slug}/api-keys/{id}/revoke", post(settings::revoke_api_key))
        .route("/app/w/{slug}/members", get(settings::members).post(settings::add_member))
        .route("/app/w/{slug}/members/{user_id}/remove", post(settings::remove_member))
        .route("/app/w/{slug}/invitations/{id}/revoke", post(settings::revoke_invitation))
        .route("/app/invite/{token}", get(invite::show).post(invite::answer))
        .route("/app/w/{slug}/branding", get(settings::branding).post(settings::save_branding))
        .route("/app/w/{slug}/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/app/w/{slug}/webhooks/{id}", get(webhooks::show))
        .route("/app/w/{slug}/webhooks/{id}/remove", post(webhooks::remove))
        .route("/app/w/{slug}/webhooks/{id}/enable", post(webhooks::enable))
        .route("/app/w/{slug}/webhooks/{id}/disable", post(webhooks::disable))
        .route("/app/w/{slug}/webhooks/{id}/rotate", post(webhooks::rotate))
        .route("/app/w/{slug}/webhooks/{id}/test", post(webhooks::send_test))
        .route("/app/w/{slug}/webhooks/deliveries/{id}/redeliver", post(webhooks::redeliver))
        .route("/app/{*rest}", get(not_found_route).post(not_found_route))
        .route("/favicon.ico", get(assets::favicon))
        .layer(axum::middleware::from_fn_with_state(state, guard_posts))
}

// ---------------------------------------------------------------------------------------------
// Cookies, client address, CSRF

/// The session cookie's name: `__Host-` prefixed (which requires `Secure`) on https.
fn session_cookie_name(state: &AppState) -> &'static str {
    session_cookie_name_for(state.config.is_https())
}

fn session_cookie_name_for(https: bool) -> &'static str {
    if https { "__Host-authlink_session" } else { "authlink_session" }
}

/// The trusted-browser cookie (see [`crate::service::users`]): sign-ins from this browser count
/// their failures against it rather than the account.
fn device_cookie_name(state: &AppState) -> &'static str {
    if state.config.is_https() { "__Host-authlink_device" } else { "authlink_device" }
}

/// The pre-sign-in cookie, which the sign-in form's CSRF token is derived from.
fn login_cookie_name(state: &AppState) -> &'static str {
    if state.config.is_https() { "__Host-authlink_login" } else { "authlink_login" }
}

/// A cookie of the request, if it has the shape of one of our tokens.
fn read_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| crate::service::links::token_well_formed(v))
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Lax, Path=/, Secure on https. `None` clears it.
fn cookie(state: &AppState, name: &str, value: Option<&str>, max_age_secs: i64) -> HeaderValue {
    let c = cookie_text(state.config.is_https(), name, value, max_age_secs);
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn cookie_text(https: bool, name: &str, value: Option<&str>, max_age_secs: i64) -> String {
    let secure = if https { "; Secure" } else { "" };
    let (value, max_age) = match value {
        Some(v) => (v, max_age_secs),
        None => ("", 0),
    };
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}")
}

/// The CSRF token of a session (or pre-sign-in) token: HMAC-SHA256 under the token, so it is
/// bound to the cookie, cannot be computed without it, and needs no storage.
fn csrf_for(token: &str) -> String {
    use base64::Engine;
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(token.as_bytes()) else { return String::new() };
    mac.update(b"authlink dashboard csrf v1");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

fn csrf_matches(token: &str, presented: &str) -> bool {
    let expected = csrf_for(token);
    !expected.is_empty() && crate::crypto::constant_time_eq(expected.as_bytes(), presented.as_bytes())
}

/// The client's address ([`crate::http::ratelimit::client_ip_of`]): the peer address, or, when
/// the peer is a trusted reverse proxy (`http.trusted_proxies`: loopback by default), the
/// first address of `X-Forwarded-For`, read from the right, that is not a trusted
/// proxy itself (the one the outermost trusted proxy saw). A client talking to us directly from
/// an untrusted address cannot choose it.
fn client_ip(parts: &Parts) -> String {
    crate::http::ratelimit::client_ip_of(&parts.headers, &parts.extensions)
        .map_or_else(|| "unknown".into(), |ip| ip.to_string())
}

/// Whether a POST comes from our own pages. Browsers send `Sec-Fetch-Site`, which pages cannot
/// forge; older ones only `Origin`. Our pages send `Referrer-Policy: no-referrer`, under which
/// browsers send `Origin: null` even for same-origin form posts, so `null` proves nothing either
/// way. Either way the CSRF token is checked too; this only refuses obvious cross-site posts.
fn is_same_origin(state: &AppState, headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "same-origin" | "none");
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None | Some("null") => true,
        Some(origin) => origin == state.config.public_url.origin().ascii_serialization(),
    }
}

/// The fields of a submitted form (`application/x-www-form-urlencoded`), parsed once by
/// [`guard_posts`].
#[derive(Clone, Default)]
pub struct FormData(Arc<Vec<(String, String)>>);

/// The fields' names only: a form may carry passwords and the CSRF token.
impl std::fmt::Debug for FormData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FormData").field(&self.0.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()).finish()
    }
}

impl FormData {
    /// The first value of `name`, or `""`.
    pub fn get(&self, name: &str) -> &str {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("")
    }

    /// Every value of `name` (repeated fields such as checkboxes).
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }

    /// Whether a checkbox named `name` was ticked.
    pub fn checked(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    /// The value of `name`, `None` when empty or blank.
    pub fn opt(&self, name: &str) -> Option<String> {
        Some(self.get(name).trim()).filter(|s| !s.is_empty()).map(str::to_string)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for FormData {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        parts.extensions.get::<FormData>().cloned().ok_or_else(|| StatusCode::BAD_REQUEST.into_response())
    }
}

/// Middleware on every dashboard route: a POST must come from our own pages and carry the CSRF
/// token of the browser's session (or pre-sign-in) cookie. Parses the form for the handler.
pub async fn guard_posts(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // A NUL character has no use in any field or filter, and PostgreSQL refuses text holding one.
    let has_nul = |encoded: &[u8]| {
        url::form_urlencoded::parse(encoded).any(|(k, v)| k.contains('\0') || v.contains('\0'))
    };
    if has_nul(req.uri().query().unwrap_or_default().as_bytes()) {
        return nul_refused();
    }
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    if !is_same_origin(&state, req.headers()) {
        tracing::warn!("cross-site dashboard post refused");
        return csrf_refused();
    }
    let (mut parts, body) = req.into_parts();
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let bytes = match axum::body::to_bytes(body, state.config.http.body_limit_bytes).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response(),
    };
    if is_form && has_nul(&bytes) {
        return nul_refused();
    }
    let pairs: Vec<(String, String)> =
        if is_form { url::form_urlencoded::parse(&bytes).into_owned().collect() } else { Vec::new() };
    let presented = pairs.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str()).unwrap_or("");
    // The pre-sign-in cookie stands behind the sign-in form only: every other form is bound to
    // the session, so that a cookie planted before sign-in cannot vouch for it.
    let pre_sign_in = parts.uri.path() == "/app/login" || parts.uri.path().starts_with("/app/invite/");
    let candidates = [
        read_cookie(&parts.headers, session_cookie_name(&state)),
        read_cookie(&parts.headers, login_cookie_name(&state)).filter(|_| pre_sign_in),
    ];
    let valid = !presented.is_empty() && candidates.iter().flatten().any(|t| csrf_matches(t, presented));
    if !valid {
        tracing::warn!(
            path = %crate::http::loggable_path(parts.uri.path()),
            token_present = !presented.is_empty(),
            "dashboard post refused: missing or invalid CSRF token"
        );
        return csrf_refused();
    }
    parts.extensions.insert(FormData(Arc::new(pairs)));
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

fn nul_refused() -> Response {
    tracing::info!("dashboard request refused: a NUL character in the address or the form");
    message(
        StatusCode::BAD_REQUEST,
        "That cannot be used",
        "The address or the form holds a NUL character, which no field accepts.",
        "Go back, check what was typed or pasted, and send it again.",
    )
}

fn csrf_refused() -> Response {
    message(
        StatusCode::FORBIDDEN,
        "Request refused",
        "This form has expired or did not come from this site, so nothing was changed.",
        "Go back, reload the page and try again.",
    )
}

// ---------------------------------------------------------------------------------------------
// The signed-in user, the workspace in view

/// A signed-in request: the user, the session and the CSRF token for the page's forms.
pub struct Ctx {
    /// The signed-in user.
    pub user: UserRow,
    /// The session.
    pub session: SessionRow,
    /// The CSRF token every form of the page carries.
    pub csrf: String,
    /// The client's address.
    pub ip: String,
    /// The audit actor.
    pub actor: Actor,
}

impl Ctx {
    /// Whether the user is a platform admin.
    pub fn is_admin(&self) -> bool {
        self.user.is_admin != 0
    }
}

/// Where an unauthenticated browser goes: the sign-in page, with the page it asked for.
fn to_sign_in(next: Option<&str>, reason: Option<&str>) -> String {
    let mut url = String::from("/app/login");
    let mut sep = '?';
    if let Some(next) = next.and_then(auth::safe_next) {
        url.push(sep);
        url.push_str("next=");
        url.extend(url::form_urlencoded::byte_serialize(next.as_bytes()));
        sep = '&';
    }
    if let Some(reason) = reason {
        url.push(sep);
        url.push_str("notice=");
        url.push_str(reason);
    }
    url
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let original =
            parts.extensions.get::<OriginalUri>().map(|u| u.0.clone()).unwrap_or(parts.uri.clone());
        let next = (parts.method == Method::GET || parts.method == Method::HEAD)
            .then(|| original.path_and_query().map(|p| p.as_str().to_string()))
            .flatten();
        let Some(token) = read_cookie(&parts.headers, session_cookie_name(state)) else {
            return Err(Redirect::to(&to_sign_in(next.as_deref(), None)).into_response());
        };
        match users::authenticate(state, token).await {
            Ok(Some(a)) => Ok(Ctx {
                csrf: csrf_for(token),
                ip: client_ip(parts),
                actor: Actor::User { id: a.user.id.clone() },
                user: a.user,
                session: a.session,
            }),
            Ok(None) => {
                let mut res = Redirect::to(&to_sign_in(next.as_deref(), Some("expired"))).into_response();
                res.headers_mut()
                    .append(header::SET_COOKIE, cookie(state, session_cookie_name(state), None, 0));
                Err(res)
            }
            Err(e) => Err(DashError::Service(e).into_response()),
        }
    }
}

/// The workspace a page is about, with the user's role there.
pub struct Ws {
    /// The workspace.
    pub row: WorkspaceRow,
    /// The user's role (admins count as owners).
    pub role: Role,
    /// What the services may see on this page: this workspace only, even for admins.
    pub scope: Scope,
}

impl Ws {
    /// Whether the user may manage members, branding and API keys.
    pub fn can_manage(&self) -> bool {
        self.role == Role::Owner
    }
}

/// Loads the workspace named in the path (slug or id) if the user may see it; otherwise 404.
pub async fn workspace(state: &AppState, ctx: &Ctx, key: &str) -> Result<Ws, DashError> {
    let row = {
        let mut conn = state.db.read().await?;
        db::workspaces::get_by_id_or_slug(&mut conn, key).await?
    };
    let Some(row) = row else { return Err(DashError::NotFound) };
    let Some(role) = users::role_in(state, &ctx.user, &row.id).await? else {
        return Err(DashError::NotFound);
    };
    let scope = Scope::Workspace(row.id.clone());
    Ok(Ws { row, role, scope })
}

/// Requires the owner role (or admin) for a settings page.
pub fn require_owner(ws: &Ws) -> Result<(), DashError> {
    if ws.can_manage() {
        Ok(())
    } else {
        Err(DashError::Forbidden("Only the workspace's owners can change this."))
    }
}

// ---------------------------------------------------------------------------------------------
// Layout

/// A workspace in the switcher.
pub struct WsLink {
    /// Name.
    pub name: String,
    /// Slug.
    pub slug: String,
}

/// The workspace in view, for the navigation.
pub struct WsNav {
    /// Name.
    pub name: String,
    /// Slug.
    pub slug: String,
    /// The user's role, in words.
    pub role: &'static str,
    /// Whether the settings tabs are shown.
    pub can_manage: bool,
}

/// What the dashboard's frame shows: who is signed in, the switcher, the tabs, a notice.
pub struct Layout {
    /// The signed-in user's email (`None` on the sign-in page).
    pub user_email: Option<String>,
    /// A platform admin.
    pub is_admin: bool,
    /// The CSRF token for the forms of the page.
    pub csrf: String,
    /// The workspace in view.
    pub workspace: Option<WsNav>,
    /// The switcher's entries.
    pub workspaces: Vec<WsLink>,
    /// Whether the switcher has more entries than shown.
    pub more_workspaces: bool,
    /// The active tab.
    pub active: &'static str,
    /// A one-line confirmation of the last action.
    pub notice: Option<&'static str>,
    /// Cache-buster of the assets.
    pub version: &'static str,
}

impl Layout {
    /// The frame of a page without a signed-in user.
    pub fn bare(csrf: String, notice: Option<&'static str>) -> Self {
        Self {
            user_email: None,
            is_admin: false,
            csrf,
            workspace: None,
            workspaces: Vec::new(),
            more_workspaces: false,
            active: "",
            notice,
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// Whether `tab` is the active tab (for `aria-current`).
    pub fn is(&self, tab: &str) -> bool {
        self.active == tab
    }
}

/// Builds the frame for a signed-in page.
pub async fn layout(
    state: &AppState,
    ctx: &Ctx,
    ws: Option<&Ws>,
    active: &'static str,
    notice: Option<&str>,
) -> Result<Layout, DashError> {
    const SWITCHER: usize = 15;
    let mut conn = state.db.read().await?;
    let mut workspaces: Vec<WsLink> = if ctx.is_admin() {
        db::workspaces::list(&mut conn, None, None, SWITCHER as i64 + 1)
            .await?
            .into_iter()
            .map(|w| WsLink { name: w.name, slug: w.slug })
            .collect()
    } else {
        db::users::workspaces_of_user(&mut conn, &ctx.user.id)
            .await?
            .into_iter()
            .map(|w| WsLink { name: w.name, slug: w.slug })
            .collect()
    };
    let more_workspaces = workspaces.len() > SWITCHER;
    workspaces.truncate(SWITCHER);
    Ok(Layout {
        user_email: Some(ctx.user.email.clone()),
        is_admin: ctx.is_admin(),
        csrf: ctx.csrf.clone(),
        workspace: ws.map(|w| WsNav {
            name: w.row.name.clone(),
            slug: w.row.slug.clone(),
            role: if ctx.is_admin() {
                "platform admin"
            } else if w.role == Role::Owner {
                "owner"
            } else {
                "member"
            },
            can_manage: w.can_manage(),
        }),
        workspaces,
        more_workspaces,
        active,
        notice: notice.and_then(notice_text),
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// The confirmations shown after a redirect (`?notice=`): fixed texts, so nothing from the URL
/// reaches the page.
fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "link_created" => "Link created. Copy it and send it to your client.",
        "link_revoked" => "Link revoked. It stopped working at once.",
        "link_rotated" => "Link rotated: it has a new address, and the old one stopped working.",
        "link_updated" => "Link saved.",
        "disconnected" => "Connection disconnected.",
        "checked_ok" => "Checked with the platform just now: the connection works.",
        "checked_transient" => {
            "The platform could not be asked just now; nothing changed. Try again in a few minutes."
        }
        "checked_broken" => {
            "Checked with the platform just now: the connection no longer works. Send the client the repair link."
        }
        "key_revoked" => "API key revoked.",
        "member_added" => "Member saved.",
        "member_removed" => "Member removed.",
        "test_sent" => "Test event queued: it shows in the deliveries below once sent.",
        "left_workspace" => "You left the workspace.",
        "invitation_revoked" => "Invitation withdrawn: its link no longer works.",
        "invitation_accepted" => "Welcome: you have joined this workspace.",
        "branding_saved" => "Branding saved.",
        "workspace_created" => "Workspace created.",
        "password_changed" => "Password changed. Your other sessions were signed out.",
        "signed_out" => "You are signed out.",
        "expired" => "Your session has ended. Please sign in again.",
        "endpoint_removed" => "Webhook endpoint removed.",
        "endpoint_enabled" => "Deliveries to this endpoint are on again.",
        "endpoint_disabled" => "Deliveries to this endpoint are paused; pending ones were cancelled.",
        "redelivered" => "Delivery queued again.",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Errors and rendering

/// Why a dashboard request failed.
#[derive(Debug)]
pub enum DashError {
    /// Nothing here, or nothing the user may see (404).
    NotFound,
    /// The user may see this but not change it (403).
    Forbidden(&'static str),
    /// A service failed.
    Service(ServiceError),
}

impl From<ServiceError> for DashError {
    fn from(e: ServiceError) -> Self {
        DashError::Service(e)
    }
}

impl From<DbError> for DashError {
    fn from(e: DbError) -> Self {
        DashError::Service(e.into())
    }
}

impl IntoResponse for DashError {
    fn into_response(self) -> Response {
        match self {
            DashError::NotFound | DashError::Service(ServiceError::NotFound(_)) => not_found(),
            DashError::Forbidden(why) => {
                message(StatusCode::FORBIDDEN, "Not allowed", why, "Ask an owner of the workspace.")
            }
            DashError::Service(ServiceError::Forbidden(why)) => {
                message(StatusCode::FORBIDDEN, "Not allowed", why, "Ask a platform admin.")
            }
            DashError::Service(ServiceError::Conflict(why)) => {
                message(StatusCode::CONFLICT, "This cannot be done", &why, "Go back and reload the page.")
            }
            DashError::Service(ServiceError::Validation(errors)) => message(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Some values are not valid",
                &errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                "Go back and correct them.",
            ),
            DashError::Service(ServiceError::Unavailable(why)) => {
                tracing::warn!(reason = %why, "dashboard: dependency unavailable");
                crate::http::pages::try_again_in_a_minute(message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Temporarily unavailable",
                    &why,
                    "Please try again in a minute.",
                ))
            }
            DashError::Service(ServiceError::Db(DbError::Unavailable(e))) => {
                tracing::error!(error = %e, "database unavailable");
                crate::http::pages::try_again_in_a_minute(message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Temporarily unavailable",
                    "The database cannot do this right now (unreachable, or busy).",
                    "Please try again in a minute.",
                ))
            }
            DashError::Service(e) => {
                tracing::error!(error = %e, "dashboard: internal error");
                message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong",
                    "An internal error occurred. Nothing was changed.",
                    "Please try again in a minute.",
                )
            }
        }
    }
}

/// The result of a dashboard handler.
pub type DashResult = Result<Response, DashError>;

/// A page with a heading, an explanation and a next step.
#[derive(Template)]
#[template(path = "dashboard/message.html")]
struct MessagePage<'a> {
    l: Layout,
    title: &'a str,
    text: &'a str,
    next_step: &'a str,
}

fn message(status: StatusCode, title: &str, text: &str, next_step: &str) -> Response {
    render(status, &MessagePage { l: Layout::bare(String::new(), None), title, text, next_step })
}

fn not_found() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is nothing here, or you do not have access to it.",
        "Pick a workspace from the list of your workspaces.",
    )
}

async fn not_found_route() -> Response {
    not_found()
}

/// Renders a template, never cached (pages show capability URLs and personal data).
pub fn render(status: StatusCode, t: &impl Template) -> Response {
    crate::http::pages::render(status, t)
}

/// A 303 to `to`.
pub fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

// ---------------------------------------------------------------------------------------------
// Form errors and display helpers

/// The validation errors of a submitted form, looked up by field in the templates.
#[derive(Debug, Default)]
pub struct FormErrors(pub Vec<FieldError>);

impl FormErrors {
    /// The message for `field`, if any.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.0.iter().find(|e| e.field == field).map(|e| e.message.as_str())
    }

    /// Whether there are errors.
    pub fn any(&self) -> bool {
        !self.0.is_empty()
    }

    /// Every error, for the summary at the top of the form.
    pub fn all(&self) -> &[FieldError] {
        &self.0
    }

    /// The words a form shows for a field, for the summary (an API name otherwise).
    pub fn label<'a>(&self, field: &'a str) -> &'a str {
        match field {
            "label" => "Label",
            "client_ref" => "Client reference",
            "expires_in" | "expires_at" => "Expires in",
            "max_uses" => "Use limit",
            "redirect_url" => "Success page button",
            "platforms" => "Platforms",
            "url" => "URL",
            "events" => "Events",
            "description" => "Note",
            "name" => "Name",
            "slug" => "Address",
            "email" => "Email",
            "role" => "Role",
            "password" => "Password",
            "confirm" => "Password again",
            "branding.display_name" => "Name clients see",
            "branding.logo_url" => "Logo URL",
            "branding.accent_color" => "Accent colour",
            "allowed_redirects" => "Allowed redirects",
            "success_redirect" => "Default success redirect",
            "version" => "Not saved",
            other => other,
        }
    }

    /// The id of the input a field name refers to, for the summary's links.
    pub fn anchor(&self, field: &str) -> String {
        match field {
            // A change saved meanwhile concerns the whole form, not one input.
            "version" => "branding-form".into(),
            other => field_id(other),
        }
    }

    /// From a service failure: validation errors, or the failure itself.
    pub fn from_service(e: ServiceError) -> Result<Self, DashError> {
        match e {
            ServiceError::Validation(errors) => Ok(Self(errors)),
            other => Err(DashError::Service(other)),
        }
    }
}

/// The field id a service's field name refers to (for the summary's links).
pub fn field_id(field: &str) -> String {
    field.replace('.', "-")
}

/// A time for people: `2025-11-25 16:19 UTC`.
pub fn fmt_time(t: time::OffsetDateTime) -> String {
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    t.to_offset(time::UtcOffset::UTC).format(&f).unwrap_or_default()
}

/// [`fmt_time`] of a database timestamp.
pub fn fmt_ms(ms: i64) -> String {
    fmt_time(crate::clock::from_millis(ms))
}

/// An optional time, or a dash.
pub fn fmt_opt(t: Option<time::OffsetDateTime>) -> String {
    t.map(fmt_time).unwrap_or_else(|| "—".into())
}

/// The query parameters of list pages.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListParams {
    /// Search text.
    #[serde(default)]
    pub q: Option<String>,
    /// The keyset cursor: rows older than this id.
    #[serde(default)]
    pub before: Option<String>,
    /// The keyset cursor of a handle search: rows after this one in handle order.
    #[serde(default)]
    pub after: Option<String>,
    /// A status filter.
    #[serde(default)]
    pub status: Option<String>,
    /// A platform filter.
    #[serde(default)]
    pub platform: Option<String>,
    /// An action filter (audit log).
    #[serde(default)]
    pub action: Option<String>,
    /// A target filter (audit log).
    #[serde(default)]
    pub target: Option<String>,
    /// A confirmation to show.
    #[serde(default)]
    pub notice: Option<String>,
}

/// Whether `s` is an id as ids are given out, in lower case.
fn is_cursor(s: &str) -> bool {
    db::is_id(s) && !s.bytes().any(|b| b.is_ascii_uppercase())
}

impl ListParams {
    /// The cursor, if it is one of our ids (in lower case, as they are given out: SQLite and
    /// PostgreSQL would compare another case differently).
    pub fn cursor(&self) -> Option<String> {
        self.before.clone().filter(|b| is_cursor(b))
    }

    /// The cursor of a handle search, if it is one of our ids (see [`cursor`](Self::cursor)).
    pub fn after_cursor(&self) -> Option<String> {
        self.after.clone().filter(|a| is_cursor(a))
    }

    /// The search text, trimmed, at most 200 characters.
    pub fn search(&self) -> Option<String> {
        self.q.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(|s| s.chars().take(200).collect())
    }
}

/// Builds a query string from pairs, skipping empty values.
pub fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            s.append_pair(k, v);
        }
    }
    let out = s.finish();
    if out.is_empty() { out } else { format!("?{out}") }
}

/// A secret read from a form field.
pub fn secret(form: &FormData, name: &str) -> secrecy::SecretString {
    secrecy::SecretString::from(form.get(name).to_string())
}

/// Whether a secret is empty.
pub fn is_blank(s: &secrecy::SecretString) -> bool {
    s.expose_secret().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_are_bound_to_the_cookie() {
        let a = crate::crypto::random_token();
        let b = crate::crypto::random_token();
        assert!(csrf_matches(&a, &csrf_for(&a)));
        assert!(!csrf_matches(&a, &csrf_for(&b)));
        assert!(!csrf_matches(&a, ""));
        assert_ne!(csrf_for(&a), a, "the token itself is never the CSRF value");
    }

    #[test]
    fn session_cookies_are_host_prefixed_and_secure_on_https() {
        assert_eq!(
            cookie_text(true, session_cookie_name_for(true), Some("tok"), 43_200),
            "__Host-authlink_session=tok; Path=/; HttpOnly; SameSite=Lax; Max-Age=43200; Secure"
        );
        assert_eq!(
            cookie_text(false, session_cookie_name_for(false), Some("tok"), 43_200),
            "authlink_session=tok; Path=/; HttpOnly; SameSite=Lax; Max-Age=43200"
        );
        assert_eq!(
            cookie_text(false, "authlink_session", None, 43_200),
            "authlink_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
        );
    }

    #[test]
    fn sign_in_redirects_keep_the_page() {
        assert_eq!(to_sign_in(Some("/app/w/acme?x=1"), None), "/app/login?next=%2Fapp%2Fw%2Facme%3Fx%3D1");
        assert_eq!(to_sign_in(Some("//evil.example"), Some("expired")), "/app/login?notice=expired");
    }

    #[test]
    fn query_strings_skip_empty_values() {
        assert_eq!(query_string(&[("q", Some("a b")), ("status", None), ("p", Some(""))]), "?q=a+b");
        assert_eq!(query_string(&[]), "");
    }
}
