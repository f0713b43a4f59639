//! Connection pages: the list (filter by status and platform, search by the start of the handle,
//! keyset pagination), the detail page (profile, scopes, token expiry, status reason, history, the
//! repair link) and disconnecting.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::{
    Ctx, DashResult, Layout, ListParams, PAGE_SIZE, fmt_ms, fmt_opt, fmt_time, layout, query_string, render,
    see_other, workspace,
};
use crate::db;
use crate::db::dashboard::{ConnectionItem, ConnectionSearch};
use crate::domain::{self, Platform};
use crate::service::ServiceError;
use crate::service::connections::{self, ConnectionStatus};
use crate::service::links;
use crate::state::AppState;

/// `(css class, words)` of a connection status.
fn status_words(status: ConnectionStatus) -> (&'static str, &'static str) {
    match status {
        ConnectionStatus::Active => ("active", "Connected"),
        ConnectionStatus::Broken => ("broken", "Broken: needs reconnecting"),
        ConnectionStatus::Disconnected => ("disconnected", "Disconnected"),
    }
}

fn handle_of(username: Option<&str>, display_name: Option<&str>, account_id: &str) -> String {
    username
        .map(|u| format!("@{u}"))
        .or_else(|| display_name.map(str::to_string))
        .unwrap_or_else(|| account_id.to_string())
}

/// A connection in a list.
pub struct ConnRow {
    /// Its page.
    pub href: String,
    /// `TikTok`.
    pub platform: &'static str,
    /// `@handle` (or display name, or account id).
    pub handle: String,
    /// Display name.
    pub name: Option<String>,
    /// CSS modifier: `active`, `broken`, `disconnected`.
    pub status: &'static str,
    /// The status in words.
    pub status_text: &'static str,
    /// Why it is broken or disconnected.
    pub reason: Option<String>,
    /// A sandbox connection.
    pub sandbox: bool,
    /// First connected.
    pub connected: String,
}

impl ConnRow {
    /// From a listing row of workspace `slug`.
    pub fn from_item(slug: &str, c: ConnectionItem) -> Self {
        let platform = c.provider.parse::<Platform>().map(Platform::display_name).unwrap_or("Unknown");
        let (status, status_text) = status_words(ConnectionStatus::parse(&c.status));
        Self {
            href: format!("/app/w/{slug}/connections/{}", c.id),
            platform,
            handle: handle_of(c.username.as_deref(), c.display_name.as_deref(), &c.provider_account_id),
            name: c.display_name,
            status,
            status_text,
            reason: c.status_reason,
            sandbox: c.sandbox != 0,
            connected: fmt_ms(c.connected_at),
        }
    }
}

/// A platform in the filter.
struct PlatformOption {
    id: &'static str,
    name: &'static str,
    selected: bool,
}

#[derive(Template)]
#[template(path = "dashboard/connections.html")]
struct ListPage {
    l: Layout,
    slug: String,
    q: String,
    /// Whether the page lists the results of a handle search (in handle order).
    searching: bool,
    status: String,
    platforms: Vec<PlatformOption>,
    rows: Vec<ConnRow>,
    next_page: Option<String>,
    first_page: Option<String>,
}

/// `GET /app/w/{slug}/connections`.
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let status = q.status.as_deref().filter(|s| matches!(*s, "active" | "broken" | "disconnected"));
    let platform = q.platform.as_deref().and_then(|p| p.parse::<Platform>().ok()).map(Platform::as_str);
    let search = q.search();
    // A handle search pages in handle order (`after`), the plain list newest first (`before`).
    let searching = search.as_deref().and_then(db::dashboard::handle_prefix).is_some();
    let (cursor_param, cursor) = if searching { ("after", q.after_cursor()) } else { ("before", q.cursor()) };
    let mut items = {
        let mut conn = state.db.read().await?;
        db::dashboard::connections(
            &mut conn,
            state.db.backend(),
            &ConnectionSearch {
                workspace_id: Some(&ws.row.id),
                status,
                provider: platform,
                search: search.as_deref(),
                cursor: cursor.as_deref(),
            },
            PAGE_SIZE + 1,
        )
        .await?
    };
    let more = items.len() as i64 > PAGE_SIZE;
    items.truncate(PAGE_SIZE as usize);
    let base = format!("/app/w/{}/connections", ws.row.slug);
    let filters = [("q", search.as_deref()), ("status", status), ("platform", platform)];
    let next_page = more.then(|| items.last().map(|c| c.id.clone())).flatten().map(|id| {
        let mut pairs = filters.to_vec();
        pairs.push((cursor_param, Some(&id)));
        format!("{base}{}", query_string(&pairs))
    });
    let first_page = cursor.is_some().then(|| format!("{base}{}", query_string(&filters)));
    let page = ListPage {
        l: layout(&state, &ctx, Some(&ws), "connections", q.notice.as_deref()).await?,
        slug: ws.row.slug.clone(),
        q: search.clone().unwrap_or_default(),
        searching,
        status: status.unwrap_or_default().to_string(),
        platforms: Platform::ALL
            .iter()
            .map(|p| PlatformOption {
                id: p.as_str(),
                name: p.display_name(),
                selected: platform == Some(p.as_str()),
            })
            .collect(),
        rows: items.into_iter().map(|c| ConnRow::from_item(&ws.row.slug, c)).collect(),
        next_page,
        first_page,
    };
    Ok(render(StatusCode::OK, &page))
}

/// An event of the connection's history.
struct HistoryItem {
    when: String,
    kind: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "dashboard/connection.html")]
struct DetailPage {
    l: Layout,
    slug: String,
    id: String,
    platform: &'static str,
    handle: String,
    display_name: String,
    account_id: String,
    monogram: String,
    status: &'static str,
    status_text: &'static str,
    reason: Option<String>,
    sandbox: bool,
    scopes: Vec<(String, std::borrow::Cow<'static, str>)>,
    access_expires: String,
    refresh_expires: String,
    connected: String,
    last_refreshed: String,
    /// When the scheduler refreshes the token next (`—` when none is planned: not active).
    next_refresh: String,
    reconnects: i64,
    link_label: Option<String>,
    link_href: Option<String>,
    repair_url: Option<String>,
    history: Vec<HistoryItem>,
    can_disconnect: bool,
    /// Active: a broken connection needs the client, not a check.
    can_check: bool,
}

/// `GET /app/w/{slug}/connections/{id}`.
pub async fn show(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let detail = connections::get(&state, &ws.scope, &id).await?;
    let c = &detail.connection;
    let link = match c.link_id.as_deref() {
        Some(link_id) => match links::get(&state, &ws.scope, link_id).await {
            Ok(l) => Some(l),
            Err(ServiceError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    let (status, status_text) = status_words(c.status);
    let handle = handle_of(c.username.as_deref(), c.display_name.as_deref(), &c.provider_account_id);
    let page = DetailPage {
        l: layout(&state, &ctx, Some(&ws), "connections", q.notice.as_deref()).await?,
        slug: ws.row.slug.clone(),
        id: c.id.clone(),
        platform: c.provider.display_name(),
        monogram: crate::http::pages::monogram(
            c.display_name.as_deref().or(c.username.as_deref()).unwrap_or("?"),
        ),
        handle,
        display_name: c.display_name.clone().unwrap_or_else(|| "—".into()),
        account_id: c.provider_account_id.clone(),
        status,
        status_text,
        reason: c.status_reason.clone(),
        sandbox: c.sandbox,
        scopes: c.scopes.iter().map(|s| (s.clone(), domain::scope_description(s))).collect(),
        access_expires: fmt_opt(c.access_token_expires_at),
        refresh_expires: fmt_opt(c.refresh_token_expires_at),
        connected: fmt_time(c.connected_at),
        last_refreshed: fmt_opt(c.last_refreshed_at),
        next_refresh: fmt_opt(c.next_refresh_at),
        reconnects: c.reconnect_count,
        link_label: link.as_ref().map(|l| l.label.clone()),
        link_href: link.as_ref().map(|l| format!("/app/w/{}/links/{}", ws.row.slug, l.id)),
        repair_url: link.as_ref().filter(|l| l.status.repairs()).map(|l| l.url.clone()),
        history: detail
            .events
            .iter()
            .rev()
            .map(|e| HistoryItem {
                when: fmt_time(e.at),
                kind: e.kind.clone(),
                detail: e.detail.clone().unwrap_or_default(),
            })
            .collect(),
        can_disconnect: c.status != ConnectionStatus::Disconnected,
        can_check: c.status == ConnectionStatus::Active,
    };
    Ok(render(StatusCode::OK, &page))
}

/// `POST /app/w/{slug}/connections/{id}/disconnect`.
pub async fn disconnect(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    // Run to its end even if the browser goes away: the grant may already be revoked.
    let (st, actor, scope) = (state.clone(), ctx.actor.clone(), ws.scope.clone());
    let c = state.detached(async move { connections::disconnect(&st, &actor, &scope, &id).await }).await?;
    Ok(see_other(&format!("/app/w/{}/connections/{}?notice=disconnected", ws.row.slug, c.id)))
}

/// `POST /app/w/{slug}/connections/{id}/check`: asks the provider now whether the grant still
/// works (the health check the jobs run), and comes back with what it said. A connection that is
/// not active is refused (409, with its status and reason), as in the API: no check is made.
pub async fn check(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    use crate::service::refresh::Outcome;
    let ws = workspace(&state, &ctx, &slug).await?;
    let c = connections::get_active_row(&state, &ws.scope, &id).await?;
    // Run to its end even if the browser goes away: a refresh's rotated token must be stored.
    let (st, conn_id) = (state.clone(), c.id.clone());
    let outcome = state.detached(async move { crate::service::refresh::check(&st, &conn_id).await }).await?;
    let (notice, words) = match outcome {
        Outcome::Refreshed(_) | Outcome::Current(_) => ("checked_ok", "current"),
        Outcome::Transient(_) => ("checked_transient", "transient"),
        Outcome::Broken(_) => ("checked_broken", "broken"),
    };
    let mut conn = state.db.writer().await?;
    crate::service::audit::record(
        &mut conn,
        state.now_ms(),
        &ctx.actor,
        Some(&ws.row.id),
        "connection.check_requested",
        "connection",
        &c.id,
        serde_json::json!({ "outcome": words }),
    )
    .await?;
    Ok(see_other(&format!("/app/w/{}/connections/{}?notice={notice}", ws.row.slug, c.id)))
}

impl ConnRow {
    /// From a service view of workspace `slug`.
    pub fn from_view(slug: &str, c: &connections::ConnectionView) -> Self {
        let (status, status_text) = status_words(c.status);
        Self {
            href: format!("/app/w/{slug}/connections/{}", c.id),
            platform: c.provider.display_name(),
            handle: handle_of(c.username.as_deref(), c.display_name.as_deref(), &c.provider_account_id),
            name: c.display_name.clone(),
            status,
            status_text,
            reason: c.status_reason.clone(),
            sandbox: c.sandbox,
            connected: fmt_time(c.connected_at),
        }
    }
}
