//! The workspace switcher, the workspace overview, the audit log, and the platform admins'
//! pages: every workspace (with the form to create one) and the search across workspaces.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::connections::ConnRow;
use super::{
    Ctx, DashError, DashResult, FormData, FormErrors, Layout, ListParams, PAGE_SIZE, fmt_time, layout,
    query_string, render, see_other, workspace,
};
use crate::db;
use crate::domain::Platform;
use crate::service::Scope;
use crate::service::audit::AuditEntryView;
use crate::service::links::{self, LinkView};
use crate::service::workspaces::{self, NewWorkspace};
use crate::state::AppState;

/// `GET /app`: straight to the only workspace, else to the switcher.
pub async fn home(State(state): State<AppState>, ctx: Ctx) -> DashResult {
    if !ctx.is_admin() {
        let mut conn = state.db.read().await?;
        let mine = db::users::workspaces_of_user(&mut conn, &ctx.user.id).await?;
        if let [only] = mine.as_slice() {
            return Ok(see_other(&format!("/app/w/{}", only.slug)));
        }
    }
    Ok(see_other("/app/workspaces"))
}

/// A workspace in the switcher page.
struct WsEntry {
    name: String,
    slug: String,
    role: String,
    created: String,
}

#[derive(Template)]
#[template(path = "dashboard/workspaces.html")]
struct WorkspacesPage {
    l: Layout,
    entries: Vec<WsEntry>,
    next_page: Option<String>,
    name: String,
    slug: String,
    errors: FormErrors,
}

/// The query of the switcher: admins page through every workspace in creation order.
#[derive(Debug, Default, serde::Deserialize)]
pub struct SwitcherParams {
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    notice: Option<String>,
}

async fn workspaces_page(
    state: &AppState,
    ctx: &Ctx,
    after: Option<String>,
    status: StatusCode,
    (name, slug, errors): (String, String, FormErrors),
    notice: Option<&str>,
) -> DashResult {
    let mut conn = state.db.read().await?;
    let (entries, next_page) = if ctx.is_admin() {
        let after = after.filter(|a| db::is_id(a));
        let mut rows = db::workspaces::list(&mut conn, None, after.as_deref(), PAGE_SIZE + 1).await?;
        let more = rows.len() as i64 > PAGE_SIZE;
        rows.truncate(PAGE_SIZE as usize);
        let next = if more { rows.last().map(|w| format!("/app/workspaces?after={}", w.id)) } else { None };
        let entries = rows
            .into_iter()
            .map(|w| WsEntry {
                created: super::fmt_ms(w.created_at),
                name: w.name,
                slug: w.slug,
                role: "platform admin".into(),
            })
            .collect();
        (entries, next)
    } else {
        let mine = db::users::workspaces_of_user(&mut conn, &ctx.user.id).await?;
        let mut entries = Vec::new();
        for m in mine {
            let created = match db::workspaces::get(&mut conn, &m.id).await? {
                Some(w) => super::fmt_ms(w.created_at),
                None => continue,
            };
            entries.push(WsEntry { name: m.name, slug: m.slug, role: m.role, created });
        }
        (entries, None)
    };
    drop(conn);
    let page = WorkspacesPage {
        l: layout(state, ctx, None, "workspaces", notice).await?,
        entries,
        next_page,
        name,
        slug,
        errors,
    };
    Ok(render(status, &page))
}

/// `GET /app/workspaces`: the workspaces the user can open (admins: every one, and a form to
/// create one).
pub async fn list(State(state): State<AppState>, ctx: Ctx, Query(q): Query<SwitcherParams>) -> DashResult {
    workspaces_page(
        &state,
        &ctx,
        q.after,
        StatusCode::OK,
        (String::new(), String::new(), FormErrors::default()),
        q.notice.as_deref(),
    )
    .await
}

/// `POST /app/workspaces`: creates a workspace (platform admins only).
pub async fn create(State(state): State<AppState>, ctx: Ctx, form: FormData) -> DashResult {
    let scope = if ctx.is_admin() { Scope::Admin } else { Scope::Workspace(String::new()) };
    let name = form.get("name").to_string();
    let slug = form.get("slug").trim().to_string();
    let input = NewWorkspace {
        name: name.clone(),
        slug: Some(slug.clone()).filter(|s| !s.is_empty()),
        branding: None,
        allowed_redirects: None,
        success_redirect: None,
    };
    match workspaces::create(&state, &ctx.actor, &scope, input).await {
        Ok(w) => Ok(see_other(&format!("/app/w/{}?notice=workspace_created", w.slug))),
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            workspaces_page(&state, &ctx, None, StatusCode::UNPROCESSABLE_ENTITY, (name, slug, errors), None)
                .await
        }
    }
}

/// One (platform, status) cell row of the overview.
struct PlatformCounts {
    name: &'static str,
    active: i64,
    broken: i64,
    disconnected: i64,
}

/// An audit entry as the pages show it.
pub struct EventView {
    /// When.
    pub when: String,
    /// Who, in words.
    pub actor: String,
    /// What, e.g. `link.created`.
    pub action: String,
    /// The kind of object.
    pub target_kind: String,
    /// The object id.
    pub target_id: String,
    /// A link to the object's page, when there is one.
    pub target_href: Option<String>,
    /// Details as compact JSON.
    pub details: String,
}

/// Turns audit entries into [`EventView`]s, naming users by email.
pub async fn event_views(
    state: &AppState,
    ws: &super::Ws,
    entries: Vec<AuditEntryView>,
) -> Result<Vec<EventView>, DashError> {
    let slug = ws.row.slug.as_str();
    let mut emails: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for mut e in entries {
        // Members do not see whom the owners invited (nor does the members page show them), nor
        // more of a webhook endpoint's URL than its origin.
        if let Some(details) = e.details.as_object_mut().filter(|_| !ws.can_manage()) {
            if e.action == "member.invited" {
                details.remove("email");
            }
            if let Some(url) = details.get_mut("url").filter(|_| e.action.starts_with("webhook.")) {
                *url = serde_json::Value::String(super::webhooks::url_as_seen_by(
                    ws,
                    url.as_str().unwrap_or(""),
                ));
            }
        }
        let actor = match (e.actor_kind.as_str(), e.actor_id.as_deref()) {
            ("user", Some(id)) => {
                if !emails.contains_key(id) {
                    let mut conn = state.db.read().await?;
                    let email = db::users::get(&mut conn, id)
                        .await?
                        .map(|u| u.email)
                        .unwrap_or_else(|| "a user".into());
                    emails.insert(id.to_string(), email);
                }
                emails.get(id).cloned().unwrap_or_default()
            }
            ("api_key", _) => "API key".into(),
            ("cli", _) => "command line".into(),
            ("client", _) => "client (through a link)".into(),
            ("system", _) => "authlink".into(),
            (other, _) => other.to_string(),
        };
        let target_href = match e.target_kind.as_str() {
            "link" => Some(format!("/app/w/{slug}/links/{}", e.target_id)),
            "connection" => Some(format!("/app/w/{slug}/connections/{}", e.target_id)),
            _ => None,
        };
        let details = match &e.details {
            serde_json::Value::Object(m) if m.is_empty() => String::new(),
            serde_json::Value::Null => String::new(),
            other => crate::domain::truncate(&other.to_string(), 300),
        };
        out.push(EventView {
            when: fmt_time(e.created_at),
            actor,
            action: e.action,
            target_kind: e.target_kind,
            target_id: e.target_id,
            target_href,
            details,
        });
    }
    Ok(out)
}

#[derive(Template)]
#[template(path = "dashboard/overview.html")]
struct OverviewPage {
    l: Layout,
    slug: String,
    name: String,
    links_active: i64,
    total_active: i64,
    total_broken: i64,
    total_disconnected: i64,
    platforms: Vec<PlatformCounts>,
    /// Broken connections (the shared list template reads `rows`).
    rows: Vec<ConnRow>,
    /// Webhook endpoints that receive no events: (id, URL, why).
    stopped_endpoints: Vec<(String, String, String)>,
    events: Vec<EventView>,
}

/// `GET /app/w/{slug}`: connections by status and platform, what needs attention, recent events.
pub async fn overview(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let (counts, links_active, broken, stopped_endpoints) = {
        let mut conn = state.db.read().await?;
        let counts = db::dashboard::connection_counts(&mut conn, &ws.row.id).await?;
        let links_active = db::dashboard::unrevoked_link_count(&mut conn, &ws.row.id).await?;
        let broken = db::dashboard::connections(
            &mut conn,
            state.db.backend(),
            &db::dashboard::ConnectionSearch {
                workspace_id: Some(&ws.row.id),
                status: Some("broken"),
                ..Default::default()
            },
            5,
        )
        .await?;
        let stopped: Vec<(String, String, String)> =
            db::webhooks::list_endpoints(&mut conn, Some(&ws.row.id))
                .await?
                .into_iter()
                .filter(|e| e.enabled == 0 && !e.is_removed())
                .map(|e| {
                    let url = super::webhooks::url_as_seen_by(&ws, &e.url);
                    (e.id, url, e.disabled_reason.unwrap_or_default())
                })
                .collect();
        (counts, links_active, broken, stopped)
    };
    let mut platforms: Vec<PlatformCounts> = Platform::ALL
        .iter()
        .map(|p| PlatformCounts { name: p.display_name(), active: 0, broken: 0, disconnected: 0 })
        .collect();
    for c in &counts {
        let Ok(p) = c.provider.parse::<Platform>() else { continue };
        let Some(row) = platforms.iter_mut().find(|r| r.name == p.display_name()) else { continue };
        match c.status.as_str() {
            "active" => row.active += c.n,
            "disconnected" => row.disconnected += c.n,
            _ => row.broken += c.n,
        }
    }
    let entries =
        crate::service::audit::list(&state, &ws.scope, Some(&ws.row.id), None, None, None, 10).await?;
    let events = event_views(&state, &ws, entries).await?;
    let page = OverviewPage {
        l: layout(&state, &ctx, Some(&ws), "overview", q.notice.as_deref()).await?,
        slug: ws.row.slug.clone(),
        name: ws.row.name.clone(),
        links_active,
        total_active: platforms.iter().map(|p| p.active).sum(),
        total_broken: platforms.iter().map(|p| p.broken).sum(),
        total_disconnected: platforms.iter().map(|p| p.disconnected).sum(),
        platforms,
        rows: broken.into_iter().map(|c| ConnRow::from_item(&ws.row.slug, c)).collect(),
        stopped_endpoints,
        events,
    };
    Ok(render(StatusCode::OK, &page))
}

/// Actions offered in the audit log's filter.
const KNOWN_ACTIONS: &[&str] = &[
    "link.created",
    "link.updated",
    "link.revoked",
    "link.rotated",
    "connection.created",
    "connection.reconnected",
    "connection.broken",
    "connection.disconnected",
    "connection.disconnect_overtaken",
    "connection.token_read",
    "api_key.created",
    "api_key.revoked",
    "workspace.created",
    "workspace.updated",
    "member.invited",
    "invitation.revoked",
    "member.added",
    "member.role_changed",
    "member.removed",
];

#[derive(Template)]
#[template(path = "dashboard/audit.html")]
struct AuditPage {
    l: Layout,
    slug: String,
    action: String,
    target: String,
    actions: &'static [&'static str],
    events: Vec<EventView>,
    next_page: Option<String>,
    first_page: Option<String>,
}

/// `GET /app/w/{slug}/audit`: the workspace's audit log, newest first, filtered by action and
/// object.
pub async fn audit_log(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let action = q
        .action
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.chars().take(80).collect::<String>());
    let target = q
        .target
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.chars().take(80).collect::<String>());
    let before = q.cursor();
    let mut entries = crate::service::audit::list(
        &state,
        &ws.scope,
        Some(&ws.row.id),
        action.as_deref(),
        target.as_deref(),
        before.as_deref(),
        PAGE_SIZE + 1,
    )
    .await?;
    let more = entries.len() as i64 > PAGE_SIZE;
    entries.truncate(PAGE_SIZE as usize);
    let base = format!("/app/w/{}/audit", ws.row.slug);
    let next_page = more.then(|| entries.last().map(|e| e.id.clone())).flatten().map(|id| {
        format!(
            "{base}{}",
            query_string(&[
                ("action", action.as_deref()),
                ("target", target.as_deref()),
                ("before", Some(&id))
            ])
        )
    });
    let first_page = before.is_some().then(|| {
        format!("{base}{}", query_string(&[("action", action.as_deref()), ("target", target.as_deref())]))
    });
    let events = event_views(&state, &ws, entries).await?;
    let page = AuditPage {
        l: layout(&state, &ctx, Some(&ws), "audit", None).await?,
        slug: ws.row.slug.clone(),
        action: action.unwrap_or_default(),
        target: target.unwrap_or_default(),
        actions: KNOWN_ACTIONS,
        events,
        next_page,
        first_page,
    };
    Ok(render(StatusCode::OK, &page))
}

/// A link found by the admins' search.
struct FoundLink {
    href: String,
    label: String,
    workspace: String,
    status: &'static str,
}

/// A connection found by the admins' search.
struct FoundConnection {
    row: ConnRow,
    workspace: String,
}

#[derive(Template)]
#[template(path = "dashboard/search.html")]
struct SearchPage {
    l: Layout,
    q: String,
    links: Vec<FoundLink>,
    connections: Vec<FoundConnection>,
    searched: bool,
}

/// `GET /app/search?q=`: platform admins search links (label, client reference) and connections
/// (the start of the handle) across every workspace.
pub async fn search(State(state): State<AppState>, ctx: Ctx, Query(q): Query<ListParams>) -> DashResult {
    if !ctx.is_admin() {
        return Err(DashError::NotFound);
    }
    let text = q.search();
    let mut found_links = Vec::new();
    let mut found_connections = Vec::new();
    if let Some(text) = &text {
        let mut names: HashMap<String, (String, String)> = HashMap::new();
        let link_rows: Vec<LinkView> = links::list(
            &state,
            &Scope::Admin,
            &links::ListQuery {
                workspace_id: None,
                search: Some(text.clone()),
                before: None,
                limit: PAGE_SIZE,
            },
        )
        .await?;
        let conn_rows = {
            let mut conn = state.db.read().await?;
            db::dashboard::connections(
                &mut conn,
                state.db.backend(),
                &db::dashboard::ConnectionSearch { search: Some(text), ..Default::default() },
                PAGE_SIZE,
            )
            .await?
        };
        let mut conn = state.db.read().await?;
        let ids: Vec<String> = link_rows
            .iter()
            .map(|l| l.workspace_id.clone())
            .chain(conn_rows.iter().map(|c| c.workspace_id.clone()))
            .collect();
        for id in ids {
            if let Entry::Vacant(slot) = names.entry(id)
                && let Some(w) = db::workspaces::get(&mut conn, slot.key()).await?
            {
                slot.insert((w.slug, w.name));
            }
        }
        drop(conn);
        for l in link_rows {
            let Some((slug, name)) = names.get(&l.workspace_id) else { continue };
            found_links.push(FoundLink {
                href: format!("/app/w/{slug}/links/{}", l.id),
                label: l.label,
                workspace: name.clone(),
                status: l.status.as_str(),
            });
        }
        for c in conn_rows {
            let Some((slug, name)) = names.get(&c.workspace_id).cloned() else { continue };
            found_connections.push(FoundConnection { row: ConnRow::from_item(&slug, c), workspace: name });
        }
    }
    let page = SearchPage {
        l: layout(&state, &ctx, None, "search", None).await?,
        searched: text.is_some(),
        q: text.unwrap_or_default(),
        links: found_links,
        connections: found_connections,
    };
    Ok(render(StatusCode::OK, &page))
}
