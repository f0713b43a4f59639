//! Webhook pages: the workspace's endpoints (the signing secret is shown once, on creation and
//! on rotation), each endpoint's delivery log with its attempts, redelivery and a test event.
//! Everyone in the workspace can look; owners (and admins) can change. Members see only the
//! origin of an endpoint's URL: its path or query may hold the receiver's own secret. A removed
//! endpoint's page stays, read-only, for its delivery log.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::{
    Ctx, DashResult, FormData, FormErrors, Layout, ListParams, PAGE_SIZE, Ws, fmt_opt, fmt_time, layout,
    query_string, render, require_owner, see_other, workspace,
};
use crate::service::webhooks::{
    self, DeliveryView, EVENT_TYPES, EndpointView, EndpointWithSecret, NewEndpoint,
};
use crate::state::AppState;

/// An endpoint as listed.
struct EndpointRowView {
    href: String,
    url: String,
    events: String,
    enabled: bool,
    disabled_reason: Option<String>,
    description: Option<String>,
    created: String,
    /// Removed: only its delivery log is left to read.
    removed: bool,
}

impl EndpointRowView {
    fn new(slug: &str, e: &EndpointView) -> Self {
        Self::with_removed(slug, e, false)
    }

    fn with_removed(slug: &str, e: &EndpointView, removed: bool) -> Self {
        Self {
            removed,
            href: format!("/app/w/{slug}/webhooks/{}", e.id),
            url: e.url.clone(),
            events: if removed {
                "none (removed)".into()
            } else if e.events.iter().any(|x| x == "*") {
                "all events".into()
            } else {
                e.events.join(", ")
            },
            enabled: e.enabled,
            disabled_reason: e.disabled_reason.clone(),
            description: e.description.clone(),
            created: fmt_time(e.created_at),
        }
    }

    /// As `ws`'s user may see it: a member sees the URL's origin only.
    fn for_role(mut self, ws: &Ws) -> Self {
        self.url = url_as_seen_by(ws, &self.url);
        self
    }
}

/// An endpoint's URL as `ws`'s user may see it: whole for owners, its origin only for members
/// (its path or query may hold the receiver's own secret).
pub fn url_as_seen_by(ws: &Ws, url: &str) -> String {
    if ws.can_manage() {
        return url.to_string();
    }
    match url::Url::parse(url) {
        Ok(u) => format!("{}/…", u.origin().ascii_serialization()),
        Err(_) => "…".into(),
    }
}

/// The values of the endpoint form.
#[derive(Debug, Default)]
pub struct EndpointForm {
    url: String,
    events: Vec<String>,
    description: String,
}

impl EndpointForm {
    /// Whether event type `t` is ticked.
    pub fn has(&self, t: &&str) -> bool {
        self.events.iter().any(|e| e == t)
    }
}

#[derive(Template)]
#[template(path = "dashboard/webhooks.html")]
struct ListPage {
    l: Layout,
    slug: String,
    endpoints: Vec<EndpointRowView>,
    /// Removed endpoints, listed for their delivery logs.
    removed: Vec<EndpointRowView>,
    created: Option<EndpointWithSecret>,
    /// The secret shown is a rotation's (the previous one signs a day more).
    rotated: Option<webhooks::Current>,
    v: EndpointForm,
    errors: FormErrors,
    event_types: &'static [&'static str],
    can_manage: bool,
}

async fn list_page(
    state: &AppState,
    ctx: &Ctx,
    ws: &Ws,
    status: StatusCode,
    (created, v, errors): (Option<EndpointWithSecret>, EndpointForm, FormErrors),
    notice: Option<&str>,
    rotated: Option<webhooks::Current>,
) -> DashResult {
    let endpoints = webhooks::list(state, &ws.scope, Some(&ws.row.id)).await?;
    let removed = webhooks::list_removed(state, &ws.scope, Some(&ws.row.id)).await?;
    let page = ListPage {
        l: layout(state, ctx, Some(ws), "webhooks", notice).await?,
        slug: ws.row.slug.clone(),
        endpoints: endpoints.iter().map(|e| EndpointRowView::new(&ws.row.slug, e).for_role(ws)).collect(),
        removed: removed
            .iter()
            .map(|e| EndpointRowView::with_removed(&ws.row.slug, e, true).for_role(ws))
            .collect(),
        rotated,
        created,
        v,
        errors,
        event_types: EVENT_TYPES,
        can_manage: ws.can_manage(),
    };
    Ok(render(status, &page))
}

/// `GET /app/w/{slug}/webhooks`.
pub async fn list(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let v = EndpointForm::default();
    list_page(&state, &ctx, &ws, StatusCode::OK, (None, v, FormErrors::default()), q.notice.as_deref(), None)
        .await
}

/// `POST /app/w/{slug}/webhooks`: adds an endpoint and shows its signing secret, this once.
pub async fn create(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    form: FormData,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    let v = EndpointForm {
        url: form.get("url").trim().to_string(),
        events: form.all("events"),
        description: form.get("description").to_string(),
    };
    let input = NewEndpoint {
        workspace_id: Some(ws.row.id.clone()),
        url: v.url.clone(),
        // Nothing ticked: every event.
        events: Some(v.events.clone()).filter(|e| !e.is_empty()),
        description: Some(v.description.clone()).filter(|d| !d.trim().is_empty()),
    };
    match webhooks::create(&state, &ctx.actor, &ws.scope, input).await {
        Ok(created) => {
            let blank = EndpointForm::default();
            let shown = (Some(created), blank, FormErrors::default());
            list_page(&state, &ctx, &ws, StatusCode::CREATED, shown, None, None).await
        }
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            list_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, (None, v, errors), None, None)
                .await
        }
    }
}

/// One attempt of a delivery.
struct AttemptRow {
    at: String,
    status_code: String,
    latency_ms: i64,
    outcome: String,
    error: String,
}

/// A delivery in the log.
struct DeliveryRow {
    id: String,
    event_id: String,
    event_type: String,
    status: String,
    attempts: i64,
    next_attempt: String,
    last_status: String,
    log: Vec<AttemptRow>,
}

impl From<DeliveryView> for DeliveryRow {
    fn from(d: DeliveryView) -> Self {
        Self {
            id: d.id,
            event_id: d.event_id,
            event_type: d.event_type,
            status: d.status,
            attempts: d.attempts,
            next_attempt: fmt_opt(d.next_attempt_at),
            last_status: d.last_status_code.map(|c| c.to_string()).unwrap_or_else(|| "—".into()),
            log: d
                .attempt_log
                .into_iter()
                .map(|a| AttemptRow {
                    at: fmt_time(a.at),
                    status_code: a.status_code.map(|c| c.to_string()).unwrap_or_else(|| "—".into()),
                    latency_ms: a.latency_ms,
                    outcome: a.outcome,
                    error: a.error.unwrap_or_default(),
                })
                .collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/webhook.html")]
struct DetailPage {
    l: Layout,
    slug: String,
    endpoint: EndpointRowView,
    id: String,
    deliveries: Vec<DeliveryRow>,
    next_page: Option<String>,
    first_page: Option<String>,
    can_manage: bool,
}

/// `GET /app/w/{slug}/webhooks/{id}`: the endpoint and its delivery log (read-only once the
/// endpoint is removed).
pub async fn show(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let row = webhooks::get_row_with_removed(&state, &ws.scope, &id).await?;
    let endpoint = EndpointView::from(&row);
    let before = q.cursor();
    let mut deliveries =
        webhooks::deliveries(&state, &ws.scope, &endpoint.id, before.as_deref(), PAGE_SIZE + 1).await?;
    let more = deliveries.len() as i64 > PAGE_SIZE;
    deliveries.truncate(PAGE_SIZE as usize);
    let base = format!("/app/w/{}/webhooks/{}", ws.row.slug, endpoint.id);
    let next_page = more
        .then(|| deliveries.last().map(|d| d.id.clone()))
        .flatten()
        .map(|id| format!("{base}{}", query_string(&[("before", Some(&id))])));
    let first_page = before.is_some().then(|| base.clone());
    let page = DetailPage {
        l: layout(&state, &ctx, Some(&ws), "webhooks", q.notice.as_deref()).await?,
        slug: ws.row.slug.clone(),
        id: endpoint.id.clone(),
        endpoint: EndpointRowView::with_removed(&ws.row.slug, &endpoint, row.is_removed()).for_role(&ws),
        deliveries: deliveries.into_iter().map(DeliveryRow::from).collect(),
        next_page,
        first_page,
        can_manage: ws.can_manage() && !row.is_removed(),
    };
    Ok(render(StatusCode::OK, &page))
}

/// `POST /app/w/{slug}/webhooks/{id}/enable`: deliveries on again, for an endpoint the agency
/// paused or one disabled after a 410 or deliveries that used up their retries.
pub async fn enable(state: State<AppState>, ctx: Ctx, path: Path<(String, String)>) -> DashResult {
    set_enabled(state, ctx, path, true).await
}

/// `POST /app/w/{slug}/webhooks/{id}/disable`: deliveries paused, pending ones cancelled.
pub async fn disable(state: State<AppState>, ctx: Ctx, path: Path<(String, String)>) -> DashResult {
    set_enabled(state, ctx, path, false).await
}

async fn set_enabled(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
    enabled: bool,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    let change = webhooks::EndpointUpdate { enabled: Some(enabled), ..Default::default() };
    let e = webhooks::update(&state, &ctx.actor, &ws.scope, &id, change).await?;
    let notice = if enabled { "endpoint_enabled" } else { "endpoint_disabled" };
    Ok(see_other(&format!("/app/w/{}/webhooks/{}?notice={notice}", ws.row.slug, e.id)))
}

/// `POST /app/w/{slug}/webhooks/{id}/rotate`: a new signing secret, shown this once (the one
/// before keeps signing for a day, so the receiver can switch over; with `leaked`, it stops now).
pub async fn rotate(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
    form: FormData,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    let current =
        if form.checked("leaked") { webhooks::Current::StopsNow } else { webhooks::Current::KeepsSigning };
    let rotated = webhooks::rotate_secret(&state, &ctx.actor, &ws.scope, &id, current).await?;
    let shown = (Some(rotated), EndpointForm::default(), FormErrors::default());
    list_page(&state, &ctx, &ws, StatusCode::OK, shown, None, Some(current)).await
}

/// `POST /app/w/{slug}/webhooks/{id}/test`: queues a `webhook.test` event to this endpoint.
pub async fn send_test(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    webhooks::send_test(&state, &ctx.actor, &ws.scope, &id).await?;
    Ok(see_other(&format!("/app/w/{}/webhooks/{id}?notice=test_sent", ws.row.slug)))
}

/// `POST /app/w/{slug}/webhooks/{id}/remove`.
pub async fn remove(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    webhooks::remove(&state, &ctx.actor, &ws.scope, &id).await?;
    Ok(see_other(&format!("/app/w/{}/webhooks?notice=endpoint_removed", ws.row.slug)))
}

/// `POST /app/w/{slug}/webhooks/deliveries/{id}/redeliver`.
pub async fn redeliver(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    let d = webhooks::redeliver(&state, &ctx.actor, &ws.scope, &id).await?;
    Ok(see_other(&format!("/app/w/{}/webhooks/{}?notice=redelivered", ws.row.slug, d.endpoint_id)))
}
