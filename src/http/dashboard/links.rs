//! Link pages: the list (search, keyset pagination), the creation form, the detail page with the
//! copy button and a QR code (server-side SVG, same origin), revoke and rotate.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use qrcode::QrCode;
use qrcode::render::svg;

use super::connections::ConnRow;
use super::{
    Ctx, DashError, DashResult, FormData, FormErrors, Layout, ListParams, PAGE_SIZE, fmt_opt, fmt_time,
    layout, query_string, render, see_other, workspace,
};
use crate::domain::FieldError;
use crate::service::links::{self, LinkStatus, LinkView, NewLink};
use crate::service::{attempts, connections, users};
use crate::state::AppState;

/// `(css class, words)` of a link status.
fn status_words(s: LinkStatus) -> (&'static str, &'static str) {
    match s {
        LinkStatus::Active => ("active", "Active"),
        LinkStatus::Revoked => ("disconnected", "Revoked"),
        LinkStatus::Expired => ("disconnected", "Expired"),
        LinkStatus::UsedUp => ("broken", "Used up"),
    }
}

/// A link in the list.
struct LinkRowView {
    href: String,
    /// The URL, for the copy button (usable links only).
    url: Option<String>,
    label: String,
    client_ref: Option<String>,
    status: &'static str,
    status_text: &'static str,
    platforms: String,
    uses: String,
    created: String,
}

impl LinkRowView {
    fn new(slug: &str, l: &LinkView) -> Self {
        let (status, status_text) = status_words(l.status);
        Self {
            href: format!("/app/w/{slug}/links/{}", l.id),
            url: (l.status == LinkStatus::Active).then(|| l.url.clone()),
            label: l.label.clone(),
            client_ref: l.client_ref.clone(),
            status,
            status_text,
            platforms: platform_names(l),
            uses: match l.max_uses {
                Some(m) => format!("{} of {m}", l.use_count),
                None => l.use_count.to_string(),
            },
            created: fmt_time(l.created_at),
        }
    }
}

fn platform_names(l: &LinkView) -> String {
    l.platforms.iter().map(|p| p.display_name()).collect::<Vec<_>>().join(", ")
}

#[derive(Template)]
#[template(path = "dashboard/links.html")]
struct ListPage {
    l: Layout,
    slug: String,
    q: String,
    rows: Vec<LinkRowView>,
    next_page: Option<String>,
    first_page: Option<String>,
}

/// `GET /app/w/{slug}/links`.
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let search = q.search();
    let before = q.cursor();
    let mut rows = links::list(
        &state,
        &ws.scope,
        &links::ListQuery {
            workspace_id: Some(ws.row.id.clone()),
            search: search.clone(),
            before: before.clone(),
            limit: PAGE_SIZE + 1,
        },
    )
    .await?;
    let more = rows.len() as i64 > PAGE_SIZE;
    rows.truncate(PAGE_SIZE as usize);
    let base = format!("/app/w/{}/links", ws.row.slug);
    let next_page = more
        .then(|| rows.last().map(|l| l.id.clone()))
        .flatten()
        .map(|id| format!("{base}{}", query_string(&[("q", search.as_deref()), ("before", Some(&id))])));
    let first_page = before.is_some().then(|| format!("{base}{}", query_string(&[("q", search.as_deref())])));
    let page = ListPage {
        l: layout(&state, &ctx, Some(&ws), "links", q.notice.as_deref()).await?,
        slug: ws.row.slug.clone(),
        q: search.unwrap_or_default(),
        rows: rows.iter().map(|l| LinkRowView::new(&ws.row.slug, l)).collect(),
        next_page,
        first_page,
    };
    Ok(render(StatusCode::OK, &page))
}

/// The values of the creation form, kept when it is shown again with errors.
#[derive(Debug, Default)]
pub struct LinkForm {
    label: String,
    client_ref: String,
    platforms: Vec<String>,
    expires_in: String,
    max_uses: String,
    redirect_url: String,
    hide_connections: bool,
    /// Editing: remove the expiry.
    no_expiry: bool,
}

impl LinkForm {
    /// Whether platform `id` is ticked.
    pub fn has(&self, id: &&str) -> bool {
        self.platforms.iter().any(|p| p == id)
    }
}

#[derive(Template)]
#[template(path = "dashboard/link_new.html")]
struct NewPage {
    l: Layout,
    slug: String,
    v: LinkForm,
    errors: FormErrors,
    platforms: Vec<(&'static str, &'static str)>,
    allow_list_empty: bool,
    title: &'static str,
    action: String,
    submit: &'static str,
    /// The edit form of an existing link (else the creation form).
    editing: bool,
    /// Editing: the current expiry, in words.
    expires_now: String,
}

/// The creation form, or with `editing` (the link and its current expiry) the edit form.
async fn form_page(
    state: &AppState,
    ctx: &Ctx,
    ws: &super::Ws,
    status: StatusCode,
    v: LinkForm,
    errors: FormErrors,
    editing: Option<(&str, String)>,
) -> DashResult {
    let slug = ws.row.slug.clone();
    let (title, action, submit, expires_now) = match &editing {
        Some((id, expires)) => {
            ("Edit the link", format!("/app/w/{slug}/links/{id}/edit"), "Save", expires.clone())
        }
        None => ("Create a link", format!("/app/w/{slug}/links"), "Create link", String::new()),
    };
    let page = NewPage {
        l: layout(state, ctx, Some(ws), "links", None).await?,
        slug,
        v,
        errors,
        platforms: state.config.enabled_platforms().iter().map(|p| (p.as_str(), p.display_name())).collect(),
        allow_list_empty: ws.row.allow_list().is_empty(),
        title,
        action,
        submit,
        editing: editing.is_some(),
        expires_now,
    };
    Ok(render(status, &page))
}

/// The form's values, as submitted.
fn submitted(form: &FormData) -> LinkForm {
    LinkForm {
        label: form.get("label").to_string(),
        client_ref: form.get("client_ref").to_string(),
        platforms: form.all("platforms"),
        expires_in: form.get("expires_in").trim().to_string(),
        max_uses: form.get("max_uses").trim().to_string(),
        redirect_url: form.get("redirect_url").trim().to_string(),
        hide_connections: form.checked("hide_connections"),
        no_expiry: form.checked("no_expiry"),
    }
}

/// The use limit field: empty is none; anything but a whole number is a field error.
fn max_uses_of(v: &LinkForm) -> Result<Option<i64>, FormErrors> {
    match v.max_uses.as_str() {
        "" => Ok(None),
        s => s
            .parse::<i64>()
            .map(Some)
            .map_err(|_| FormErrors(vec![FieldError::new("max_uses", "must be a whole number")])),
    }
}

/// `GET /app/w/{slug}/links/{id}/edit`: the link's settings in the form.
pub async fn edit_form(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let link = links::get(&state, &ws.scope, &id).await?;
    let v = LinkForm {
        label: link.label.clone(),
        client_ref: link.client_ref.clone().unwrap_or_default(),
        platforms: link.platforms.iter().map(|p| p.as_str().to_string()).collect(),
        expires_in: String::new(),
        max_uses: link.max_uses.map(|m| m.to_string()).unwrap_or_default(),
        redirect_url: link.redirect_url.clone().unwrap_or_default(),
        hide_connections: link.hide_connections,
        no_expiry: false,
    };
    let editing = Some((link.id.as_str(), fmt_opt(link.expires_at)));
    form_page(&state, &ctx, &ws, StatusCode::OK, v, FormErrors::default(), editing).await
}

/// `POST /app/w/{slug}/links/{id}/edit`: saves the settings, or shows the form again with the
/// errors next to the fields and the values kept.
pub async fn edit(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
    form: FormData,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let link = links::get(&state, &ws.scope, &id).await?;
    let v = submitted(&form);
    let editing = Some((link.id.as_str(), fmt_opt(link.expires_at)));
    let max_uses = match max_uses_of(&v) {
        Ok(m) => m,
        Err(errors) => {
            return form_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, v, errors, editing).await;
        }
    };
    let expires_at = if v.no_expiry {
        Some(None)
    } else if v.expires_in.is_empty() {
        None
    } else {
        match crate::domain::parse_duration("expires_in", &v.expires_in) {
            Ok(d) => Some(Some(state.now() + d)),
            Err(e) => {
                let errors = FormErrors(vec![e]);
                return form_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, v, errors, editing)
                    .await;
            }
        }
    };
    let change = links::LinkUpdate {
        label: Some(v.label.clone()),
        client_ref: Some(Some(v.client_ref.clone()).filter(|s| !s.trim().is_empty())),
        expires_at,
        expires_in: None,
        redirect_url: Some(Some(v.redirect_url.clone()).filter(|s| !s.is_empty())),
        hide_connections: Some(v.hide_connections),
        platforms: Some(v.platforms.clone()),
        max_uses: Some(max_uses),
    };
    match links::update(&state, &ctx.actor, &ws.scope, &link.id, change).await {
        Ok(l) => Ok(see_other(&format!("/app/w/{}/links/{}?notice=link_updated", ws.row.slug, l.id))),
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            form_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, v, errors, editing).await
        }
    }
}

/// `GET /app/w/{slug}/links/new`.
pub async fn new_form(State(state): State<AppState>, ctx: Ctx, Path(slug): Path<String>) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let v = LinkForm {
        platforms: state.config.enabled_platforms().iter().map(|p| p.as_str().to_string()).collect(),
        ..LinkForm::default()
    };
    form_page(&state, &ctx, &ws, StatusCode::OK, v, FormErrors::default(), None).await
}

/// `POST /app/w/{slug}/links`: creates a link, or shows the form again with the errors next to
/// the fields and the values kept.
pub async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    form: FormData,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let v = submitted(&form);
    let max_uses = match max_uses_of(&v) {
        Ok(m) => m,
        Err(errors) => {
            return form_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, v, errors, None).await;
        }
    };
    let input = NewLink {
        workspace_id: Some(ws.row.id.clone()),
        label: v.label.clone(),
        client_ref: Some(v.client_ref.clone()).filter(|s| !s.trim().is_empty()),
        // No platform ticked is an error the service names (an absent list means "all").
        platforms: Some(v.platforms.clone()),
        expires_in: Some(v.expires_in.clone()).filter(|s| !s.is_empty()),
        expires_at: None,
        max_uses,
        redirect_url: Some(v.redirect_url.clone()).filter(|s| !s.is_empty()),
        hide_connections: Some(v.hide_connections),
    };
    match links::create(&state, &ctx.actor, &ws.scope, input).await {
        Ok(l) => Ok(see_other(&format!("/app/w/{}/links/{}?notice=link_created", ws.row.slug, l.id))),
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            form_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, v, errors, None).await
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/link.html")]
struct DetailPage {
    l: Layout,
    slug: String,
    link: LinkView,
    status: &'static str,
    status_text: &'static str,
    usable: bool,
    /// Used up: it only repairs the accounts it connected.
    used_up: bool,
    platforms: String,
    expires: String,
    last_used: String,
    created: String,
    revoked: String,
    rotated: String,
    created_by: String,
    connections: Vec<ConnRow>,
    attempts: Vec<AttemptRow>,
}

/// How many attempts the link page lists (the API lists them all).
const ATTEMPTS_SHOWN: i64 = 20;

/// One connect attempt on the link page.
struct AttemptRow {
    started: String,
    platform: &'static str,
    /// `connected`, `failed`, `in_progress` or `abandoned`, for the badge's class.
    status: &'static str,
    status_text: &'static str,
    description: String,
    reference: String,
    connection_href: Option<String>,
}

impl AttemptRow {
    fn from_view(slug: &str, a: &attempts::ConnectAttempt) -> Self {
        use attempts::AttemptStatus;
        Self {
            started: fmt_time(a.started_at),
            platform: a
                .provider
                .parse::<crate::domain::Platform>()
                .map_or("Unknown platform", |p| p.display_name()),
            status: a.status.as_str(),
            status_text: match a.status {
                AttemptStatus::Connected => "Connected",
                AttemptStatus::Failed => "Failed",
                AttemptStatus::InProgress => "In progress",
                AttemptStatus::Abandoned => "Abandoned",
            },
            description: a.description.clone(),
            reference: a.reference.clone(),
            connection_href: a.connection_id.as_ref().map(|id| format!("/app/w/{slug}/connections/{id}")),
        }
    }
}

/// `GET /app/w/{slug}/links/{id}`: the link, its URL with a copy button and a QR code, the
/// accounts connected through it, revoke and rotate.
pub async fn show(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let link = links::get(&state, &ws.scope, &id).await?;
    let conns = connections::list(
        &state,
        &ws.scope,
        &connections::ListQuery {
            workspace_id: Some(ws.row.id.clone()),
            link_id: Some(link.id.clone()),
            limit: 50,
            ..Default::default()
        },
    )
    .await?;
    let tried = attempts::of_link(&state, &ws.scope, &link.id, None, ATTEMPTS_SHOWN).await?;
    let (status, status_text) = status_words(link.status);
    let created_by = match link.created_by.strip_prefix("user:") {
        Some(user_id) => {
            users::get(&state, user_id).await.map(|u| u.email).unwrap_or_else(|_| link.created_by.clone())
        }
        None if link.created_by == "cli" => "the command line".into(),
        None if link.created_by.starts_with("api_key:") => "an API key".into(),
        None => link.created_by.clone(),
    };
    let page = DetailPage {
        l: layout(&state, &ctx, Some(&ws), "links", q.notice.as_deref()).await?,
        slug: ws.row.slug.clone(),
        status,
        status_text,
        usable: matches!(link.status, LinkStatus::Active | LinkStatus::UsedUp),
        used_up: link.status == LinkStatus::UsedUp,
        platforms: platform_names(&link),
        expires: fmt_opt(link.expires_at),
        last_used: fmt_opt(link.last_used_at),
        created: fmt_time(link.created_at),
        revoked: fmt_opt(link.revoked_at),
        rotated: fmt_opt(link.rotated_at),
        created_by,
        connections: conns.iter().map(|c| ConnRow::from_view(&ws.row.slug, c)).collect(),
        attempts: tried.iter().map(|a| AttemptRow::from_view(&ws.row.slug, a)).collect(),
        link,
    };
    Ok(render(StatusCode::OK, &page))
}

/// `GET /app/w/{slug}/links/{id}/qr.svg`: the link's URL as a QR code (SVG, never cached).
pub async fn qr_code(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let link = links::get(&state, &ws.scope, &id).await?;
    // A used-up link still repairs its accounts: its page shows the code too.
    if !matches!(link.status, LinkStatus::Active | LinkStatus::UsedUp) {
        return Err(DashError::NotFound);
    }
    let code = QrCode::new(link.url.as_bytes()).map_err(|e| {
        tracing::error!(error = %e, "QR code could not be made");
        DashError::NotFound
    })?;
    let image = code
        .render::<svg::Color<'_>>()
        .min_dimensions(240, 240)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .build();
    let mut res = ([(header::CONTENT_TYPE, "image/svg+xml")], image).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// `POST /app/w/{slug}/links/{id}/revoke`.
pub async fn revoke(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let l = links::revoke(&state, &ctx.actor, &ws.scope, &id).await?;
    Ok(see_other(&format!("/app/w/{}/links/{}?notice=link_revoked", ws.row.slug, l.id)))
}

/// `POST /app/w/{slug}/links/{id}/rotate`.
pub async fn rotate(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let l = links::rotate(&state, &ctx.actor, &ws.scope, &id).await?;
    Ok(see_other(&format!("/app/w/{}/links/{}?notice=link_rotated", ws.row.slug, l.id)))
}
