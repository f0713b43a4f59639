//! Client-facing HTML pages: the link landing page, the connect flow and its result pages.
//!
//! Every page is server-rendered (askama, auto-escaped), needs no JavaScript, loads nothing from
//! another origin, and is sent with `Cache-Control: no-store` and `Referrer-Policy: no-referrer`
//! (the URL of a link page is a capability). A GET never changes state: mail scanners and chat
//! previews fetch links; the connect buttons are POST forms.

/// Starting the OAuth flow and handling the provider's callback.
pub mod connect;
/// Meta's deauthorize and data deletion callbacks.
pub mod deauth;

use askama::Template;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use crate::db::links::PublicLinkRow;
use crate::db::workspaces::WorkspaceRow;
use crate::db::{self, DbError};
use crate::domain::{self, Platform};
use crate::service::ServiceError;
use crate::service::links::{self, LinkStatus};
use crate::service::logos;
use crate::state::AppState;

/// The page routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/l/{token}", get(show_link))
        .route("/l/{token}/connect/{platform}", post(connect::start_connect))
        .route("/oauth/{provider}/callback", get(connect::oauth_callback))
        .route("/oauth/{provider}/failed", get(connect::show_refusal))
        .route("/oauth/instagram/deauthorize", post(deauth::instagram_deauthorize))
        .route("/oauth/instagram/data-deletion", post(deauth::instagram_data_deletion))
        .route("/oauth/instagram/data-deletion/{code}", get(deauth::instagram_deletion_status))
        .route("/connected/{attempt}", get(connect::show_result))
        .route("/connected/{attempt}/avatar", get(connect::show_avatar))
        .route("/brand/{file}", get(brand_stylesheet))
        .route("/brand/{workspace_id}/logo/{sha256}", get(brand_logo))
}

/// Renders a template with `status`, never cached.
pub fn render(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => {
            let mut res = (status, Html(html)).into_response();
            res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        Err(e) => {
            tracing::error!(error = %e, "template rendering failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

/// A page with a title, an explanation, and optionally a next step and a "try again" link.
#[derive(Template, Default)]
#[template(path = "client/message.html")]
pub struct MessagePage {
    /// Heading.
    pub title: String,
    /// What happened, in plain words.
    pub message: String,
    /// What to do next.
    pub next_step: Option<String>,
    /// Where "Try again" leads.
    pub try_again: Option<String>,
    /// The words of that button, when not "Try again".
    pub try_again_label: Option<&'static str>,
    /// A reference to quote to support (never a secret).
    pub reference: Option<String>,
    /// The short reference of the connect attempt the page is about, which the agency finds in
    /// its list of the link's attempts.
    pub attempt: Option<String>,
    /// The simulated platform, when the page is about an attempt at a sandbox provider.
    pub sandbox: Option<&'static str>,
    /// The workspace, for branding.
    pub workspace_name: Option<String>,
    /// The workspace id, for its stylesheet.
    pub workspace_id: Option<String>,
    /// Cache-buster of the brand stylesheet.
    pub brand_version: i64,
    /// The path of the workspace's logo copy, if it has one.
    pub logo: Option<String>,
}

impl MessagePage {
    /// A plain message page.
    pub fn new(title: impl Into<String>, message: impl Into<String>) -> Self {
        Self { title: title.into(), message: message.into(), ..Self::default() }
    }

    /// Brands the page with a workspace.
    pub fn branded<'a>(mut self, brand: impl Into<Brand<'a>>) -> Self {
        let brand = brand.into();
        self.workspace_name = Some(brand.name.to_string());
        self.workspace_id = Some(brand.workspace_id.to_string());
        self.brand_version = brand.version;
        self.logo = brand.logo_path();
        self
    }

    /// Adds a next step.
    pub fn next(mut self, s: impl Into<String>) -> Self {
        self.next_step = Some(s.into());
        self
    }

    /// Adds a "try again" link.
    pub fn retry(mut self, href: impl Into<String>) -> Self {
        self.try_again = Some(href.into());
        self
    }
}

/// The 404 page for unknown paths.
pub async fn not_found() -> Response {
    not_found_page()
}

/// The 404 page for unknown or malformed link tokens.
pub(crate) fn link_not_found() -> Response {
    render(
        StatusCode::NOT_FOUND,
        &MessagePage::new(
            "This link does not work",
            "We could not find this link. It may have been cut short when it was copied, or replaced by a newer one.",
        )
        .next("Open the link again from the message you were sent, or ask the agency that sent it for a new one."),
    )
}

/// What a client page shows of a workspace: its public name, and its stylesheet (by id and
/// version).
#[derive(Debug, Clone, Copy)]
pub struct Brand<'a> {
    /// The workspace.
    pub workspace_id: &'a str,
    /// The name clients see.
    pub name: &'a str,
    /// The workspace's last change (ms).
    pub version: i64,
    /// The SHA-256 of its logo copy, if it has one.
    pub logo_sha256: Option<&'a str>,
}

impl Brand<'_> {
    /// The path of the workspace's logo copy, if it has one.
    pub fn logo_path(&self) -> Option<String> {
        self.logo_sha256.map(|sha| logos::path(self.workspace_id, sha))
    }
}

impl<'a> From<&'a WorkspaceRow> for Brand<'a> {
    fn from(w: &'a WorkspaceRow) -> Self {
        Self {
            workspace_id: &w.id,
            name: w.public_name(),
            version: w.updated_at,
            logo_sha256: w.logo_sha256.as_deref(),
        }
    }
}

impl<'a> From<&'a PublicLinkRow> for Brand<'a> {
    fn from(l: &'a PublicLinkRow) -> Self {
        Self {
            workspace_id: &l.workspace_id,
            name: l.workspace_display_name.as_deref().unwrap_or(&l.workspace_name),
            version: l.workspace_updated_at,
            logo_sha256: l.workspace_logo_sha256.as_deref(),
        }
    }
}

/// The 410 page for revoked, expired or used-up links, branded with the link's workspace.
pub(crate) fn link_gone<'a>(status: LinkStatus, brand: impl Into<Brand<'a>>) -> Response {
    let w = brand.into();
    let why = match status {
        LinkStatus::Revoked => "This link has been switched off.",
        LinkStatus::Expired => "This link has expired.",
        LinkStatus::UsedUp => "This link has already been used as many times as allowed.",
        LinkStatus::Active => "This link cannot be used.",
    };
    render(
        StatusCode::GONE,
        &MessagePage::new("This link no longer works", why)
            .next(format!(
                "Accounts already connected through it stay connected. To connect another account, or to repair \
                 one that stopped working, ask {} to send you a new link.",
                w.name
            ))
            .branded(w),
    )
}

/// The 503 page when the database is unreachable.
pub fn unavailable() -> Response {
    unavailable_back_to(None)
}

/// [`unavailable`], with a "Try again" to `retry` (a link's page, after a form's post).
fn unavailable_back_to(retry: Option<String>) -> Response {
    let mut page = MessagePage::new(
        "Temporarily unavailable",
        "We are having a problem on our side. Nothing was changed.",
    )
    .next("Please try again in a minute.");
    page.try_again = retry;
    try_again_in_a_minute(render(StatusCode::SERVICE_UNAVAILABLE, &page))
}

/// The 503 page when a request did not finish within `http.request_timeout_secs`.
pub fn timed_out(retry: Option<String>) -> Response {
    let mut page = MessagePage::new("This took too long", "We did not finish answering in time.")
        .next("Please try again in a minute.");
    page.try_again = retry;
    try_again_in_a_minute(render(StatusCode::SERVICE_UNAVAILABLE, &page))
}

/// A 503 page's `Retry-After`: the minute its words ask for.
pub(crate) fn try_again_in_a_minute(mut res: Response) -> Response {
    res.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
    res
}

/// The 500 page for an internal error.
pub fn internal_error(retry: Option<String>) -> Response {
    let mut page =
        MessagePage::new("Something went wrong", "We had a problem on our side. Nothing was changed.")
            .next("Please try again in a minute.");
    page.try_again = retry;
    render(StatusCode::INTERNAL_SERVER_ERROR, &page)
}

/// The 405 page for a method a page's address does not take (axum adds `Allow`).
pub async fn method_not_allowed() -> Response {
    render(
        StatusCode::METHOD_NOT_ALLOWED,
        &MessagePage::new("This cannot be done here", "This address does not take this kind of request.")
            .next("Open the page from a link or a button instead."),
    )
}

/// Maps a service failure to an HTML page.
pub fn service_error_page(e: ServiceError) -> Response {
    service_error_page_back_to(e, None)
}

/// [`service_error_page`], with a "Try again" to `retry` (the link's page, for its pages and
/// forms: reloading a form's answer would post it again).
pub fn service_error_page_back_to(e: ServiceError, retry: Option<String>) -> Response {
    match e {
        ServiceError::Db(DbError::Unavailable(e)) => {
            tracing::error!(error = %e, "database unavailable");
            unavailable_back_to(retry)
        }
        ServiceError::NotFound(_) => not_found_page(),
        other => {
            tracing::error!(error = %other, "internal error on a page");
            internal_error(retry)
        }
    }
}

/// The link's page for a request to `path`, when `path` is one of a link's (`/l/{token}…`): where
/// "Try again" leads from a failure of that request.
pub fn link_page_of(path: &str) -> Option<String> {
    let token = path.strip_prefix("/l/")?.split('/').next().filter(|t| !t.is_empty())?;
    Some(format!("/l/{token}"))
}

pub(crate) fn not_found_page() -> Response {
    render(
        StatusCode::NOT_FOUND,
        &MessagePage::new("Page not found", "There is nothing at this address.")
            .next("Check that you copied the whole link you were sent."),
    )
}

/// One platform button on the landing page.
pub struct PlatformOption {
    /// `tiktok`.
    pub id: &'static str,
    /// `TikTok`.
    pub name: &'static str,
    /// What the agency will be able to do.
    pub grants: Vec<std::borrow::Cow<'static, str>>,
    /// Whether the provider runs in sandbox mode.
    pub sandbox: bool,
}

/// One account already connected through the link.
pub struct ConnectedAccount {
    /// `TikTok`.
    pub platform: &'static str,
    /// `tiktok`.
    pub platform_id: &'static str,
    /// `@handle` or display name.
    pub handle: String,
    /// CSS modifier: `active`, `broken`, `disconnected`.
    pub status_class: &'static str,
    /// Plain words.
    pub status_text: &'static str,
    /// Whether to offer a one-tap reconnect.
    pub needs_reconnect: bool,
    /// A sandbox connection.
    pub sandbox: bool,
}

impl ConnectedAccount {
    /// Removed by the agency: not one for a used-up link to reconnect.
    fn removed(&self) -> bool {
        self.status_class == "disconnected"
    }
}

#[derive(Template)]
#[template(path = "client/landing.html")]
struct LandingPage<'a> {
    token: &'a str,
    /// The start forms' hidden field ([`connect::form_token`]).
    form: String,
    label: &'a str,
    workspace_name: &'a str,
    workspace_id: &'a str,
    brand_version: i64,
    monogram: String,
    /// The path of the workspace's logo copy, shown instead of the monogram.
    logo: Option<String>,
    /// The page's heading, also its title.
    heading: String,
    /// The level of the platforms' headings: under a heading of their own on a used-up link's page.
    card_heading: &'static str,
    platforms: Vec<PlatformOption>,
    any_sandbox: bool,
    /// Broken accounts this page can reconnect: listed first, each with its button.
    attention: Vec<ConnectedAccount>,
    /// The other accounts connected through the link.
    connections: Vec<ConnectedAccount>,
    /// The link is used up: it only reconnects the accounts it connected.
    repair_only: bool,
}

/// The first letter of a name, for the monogram that stands in for a logo (client pages load
/// nothing from other origins).
pub fn monogram(name: &str) -> String {
    name.chars().find(|c| c.is_alphanumeric()).map(|c| c.to_uppercase().to_string()).unwrap_or_default()
}

/// `GET /l/{token}`: the landing page. Read-only.
async fn show_link(State(state): State<AppState>, Path(token): Path<String>, headers: HeaderMap) -> Response {
    // A used-up link still repairs the accounts it connected: its page says so and offers that.
    let (link, repair_only) = match links::resolve_public(&state, &token).await {
        Ok(Some((link, LinkStatus::Active))) => (link, false),
        Ok(Some((link, LinkStatus::UsedUp))) => (link, true),
        Ok(Some((link, status))) => return link_gone(status, &link),
        Ok(None) => return link_not_found(),
        Err(e) => return service_error_page(e),
    };
    let mut platforms: Vec<PlatformOption> = domain::platforms_from_db(&link.platforms)
        .into_iter()
        .filter_map(|p| state.providers.get(p).map(|provider| (p, provider)))
        .map(|(p, provider)| PlatformOption {
            id: p.as_str(),
            name: p.display_name(),
            grants: provider.scopes().iter().map(|s| domain::scope_description(s)).collect(),
            sandbox: provider.is_sandbox(),
        })
        .collect();
    // `use_count` counts every connection made through the link (in the transaction that makes
    // it), so a link never used has none to list: most openings, by a client about to connect.
    let mut connections = if link.hide_connections != 0 || link.use_count == 0 {
        Vec::new()
    } else {
        match connect::accounts_of_link(&state, &link.id).await {
            Ok(c) => c,
            Err(e) => return service_error_page(e),
        }
    };
    // A broken account of a platform the link no longer offers (or this instance has switched
    // off) cannot be repaired here: no button that leads nowhere.
    for c in connections.iter_mut().filter(|c| c.needs_reconnect) {
        if !platforms.iter().any(|p| p.id == c.platform_id) {
            c.needs_reconnect = false;
            c.status_text = "Needs reconnecting, through a link that offers it";
        }
    }
    // Those a client came back to repair come first, above the platforms.
    let (attention, connections): (Vec<ConnectedAccount>, Vec<ConnectedAccount>) =
        connections.into_iter().partition(|c| c.needs_reconnect);
    let brand = Brand::from(&link);
    if platforms.is_empty() {
        // Every platform the link offers is switched off on this instance: nothing to press.
        let page = MessagePage::new(
            "Nothing to connect right now",
            "This link offers no platform that can be connected at the moment.",
        )
        .next(format!("Try again later, or ask {} about it.", brand.name))
        .branded(brand);
        return render(StatusCode::SERVICE_UNAVAILABLE, &page);
    }
    let any_sandbox = platforms.iter().any(|p| p.sandbox);
    let listed = link.hide_connections == 0;
    let heading = if repair_only {
        // A used-up link reconnects only its own accounts: where the page lists them, it offers
        // the platforms of those it can reconnect (not those the agency removed), and no other.
        if listed {
            platforms.retain(|p| {
                connections.iter().any(|c: &ConnectedAccount| c.platform_id == p.id && !c.removed())
            });
        }
        repair_heading(listed, &platforms, &attention, &connections)
    } else {
        match platforms.as_slice() {
            [only] => format!("Connect your {} account", only.name),
            _ => "Connect your accounts".to_owned(),
        }
    };
    // The page sets the browser-binding cookie its forms are bound to.
    let (browser, cookie) = connect::browser_cookie(&state, &headers);
    let page = LandingPage {
        token: &token,
        heading,
        card_heading: if repair_only { "h3" } else { "h2" },
        form: connect::form_token(&browser),
        label: &link.label,
        workspace_name: brand.name,
        workspace_id: brand.workspace_id,
        brand_version: brand.version,
        monogram: monogram(brand.name),
        logo: brand.logo_path(),
        any_sandbox,
        platforms,
        attention,
        connections,
        repair_only,
    };
    let mut res = render(StatusCode::OK, &page);
    res.headers_mut().insert(header::SET_COOKIE, cookie);
    res
}

/// The heading of a used-up link's page: the accounts it can reconnect, by platform where the
/// page lists them (`attention` and the reconnectable ones among `others`), else the platforms
/// it offers.
fn repair_heading(
    listed: bool,
    platforms: &[PlatformOption],
    attention: &[ConnectedAccount],
    others: &[ConnectedAccount],
) -> String {
    let mut names: Vec<&str> = if listed {
        let reconnectable =
            others.iter().filter(|c| !c.removed() && platforms.iter().any(|p| p.id == c.platform_id));
        attention.iter().chain(reconnectable).map(|c| c.platform).collect()
    } else {
        platforms.iter().map(|p| p.name).collect()
    };
    let accounts = names.len();
    names.sort_unstable();
    names.dedup();
    match names.as_slice() {
        [one] if listed && accounts > 1 => format!("Reconnect your {one} accounts"),
        [one] => format!("Reconnect your {one} account"),
        _ => "Reconnect your accounts".to_owned(),
    }
}

/// `GET /brand/{workspace_id}.css`: the workspace's accent colour as a stylesheet, so that pages
/// need no inline styles (the CSP forbids them).
async fn brand_stylesheet(State(state): State<AppState>, Path(file): Path<String>) -> Response {
    let Some(id) = file.strip_suffix(".css").filter(|id| db::is_id(id)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let row = match state.db.read().await {
        Ok(mut conn) => db::workspaces::get(&mut conn, id).await,
        Err(e) => Err(e),
    };
    let w = match row {
        Ok(Some(w)) => w,
        Ok(None) => return StatusCode::NOT_FOUND.into_response(),
        // Not a 404, which the browser would take for "no colours" until it asks again.
        Err(e) => {
            tracing::warn!(error = %e, "the brand stylesheet could not be read");
            return (StatusCode::SERVICE_UNAVAILABLE, [(header::CACHE_CONTROL, "no-store")]).into_response();
        }
    };
    // The colour was validated as #rrggbb on write; re-check so nothing else reaches CSS.
    let accent = w.accent_color.as_deref().and_then(|c| domain::parse_accent_color(c).ok());
    let css = match accent {
        Some(c) => format!(":root {{ --accent: {c}; --accent-text: {}; }}\n", contrast_text(&c)),
        None => String::new(),
    };
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=300")], css)
        .into_response()
}

/// `GET /brand/{workspace_id}/logo/{sha256}`: the copy of the workspace's logo that authlink
/// took when its URL was set (see [`logos`]). The name is the copy's SHA-256, so the answer never
/// changes and is cached for a year; a name that is not the current copy's is a 404.
async fn brand_logo(
    State(state): State<AppState>,
    Path((workspace_id, sha256)): Path<(String, String)>,
) -> Response {
    let well_formed =
        sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !db::is_id(&workspace_id) || !well_formed {
        return StatusCode::NOT_FOUND.into_response();
    }
    let found = match state.db.read().await {
        Ok(mut conn) => db::workspaces::get_logo(&mut conn, &workspace_id, &sha256).await,
        Err(e) => Err(e),
    };
    let logo = match found {
        Ok(Some(logo)) => logo,
        Ok(None) => return StatusCode::NOT_FOUND.into_response(),
        Err(e) => return service_error_page(e.into()),
    };
    // Stored only after its bytes were read as one of these; checked again on the way out.
    let Some(content_type) = logos::CONTENT_TYPES.into_iter().find(|t| *t == logo.content_type) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            (header::HeaderName::from_static("cross-origin-resource-policy"), "same-origin"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; sandbox; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
            ),
        ],
        logo.bytes,
    )
        .into_response()
}

/// Black or white text, whichever reads better on `#rrggbb` (WCAG relative luminance).
pub fn contrast_text(hex: &str) -> &'static str {
    let channel = |i: usize| {
        let v = f64::from(u8::from_str_radix(hex.get(i..i + 2).unwrap_or("00"), 16).unwrap_or(0)) / 255.0;
        if v <= 0.039_28 { v / 12.92 } else { ((v + 0.055) / 1.055).powf(2.4) }
    };
    let l = 0.2126 * channel(1) + 0.7152 * channel(3) + 0.0722 * channel(5);
    if l > 0.179 { "#000000" } else { "#ffffff" }
}

/// The platform named in a path segment, if we know it.
pub fn platform_from_path(s: &str) -> Option<Platform> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contrast() {
        assert_eq!(contrast_text("#ffffff"), "#000000");
        assert_eq!(contrast_text("#000000"), "#ffffff");
        assert_eq!(contrast_text("#4f46e5"), "#ffffff");
        assert_eq!(contrast_text("#ffd400"), "#000000");
    }

    #[test]
    fn a_used_up_links_heading_names_what_it_can_reconnect() {
        let platform = |id: &'static str, name: &'static str| PlatformOption {
            id,
            name,
            grants: Vec::new(),
            sandbox: false,
        };
        let account = |platform_id: &'static str, platform: &'static str, status_class: &'static str| {
            ConnectedAccount {
                platform,
                platform_id,
                handle: "@a".into(),
                status_class,
                status_text: "",
                needs_reconnect: status_class == "broken",
                sandbox: false,
            }
        };
        let tiktok = [platform("tiktok", "TikTok")];
        let both = [platform("tiktok", "TikTok"), platform("instagram", "Instagram")];
        let broken = [account("tiktok", "TikTok", "broken")];
        let active = [account("tiktok", "TikTok", "active")];
        let removed = [account("instagram", "Instagram", "disconnected")];
        let instagram = [account("instagram", "Instagram", "active")];
        assert_eq!(repair_heading(true, &tiktok, &broken, &[]), "Reconnect your TikTok account");
        assert_eq!(repair_heading(true, &tiktok, &broken, &active), "Reconnect your TikTok accounts");
        // An account the agency removed is not one to reconnect.
        assert_eq!(repair_heading(true, &both, &broken, &removed), "Reconnect your TikTok account");
        assert_eq!(repair_heading(true, &both, &broken, &instagram), "Reconnect your accounts");
        // Not listed: by the platforms offered.
        assert_eq!(repair_heading(false, &tiktok, &[], &[]), "Reconnect your TikTok account");
        assert_eq!(repair_heading(false, &both, &[], &[]), "Reconnect your accounts");
    }

    #[test]
    fn monograms() {
        assert_eq!(monogram("acme"), "A");
        assert_eq!(monogram("  ßeta"), "SS");
        assert_eq!(monogram(""), "");
    }
}
