//! Webhooks: per-workspace endpoints, the durable outbox, signing per the Standard Webhooks
//! specification, delivery logs and manual redelivery.
//!
//! An event is written to the outbox ([`emit`]) inside the transaction of the change that caused
//! it, with one delivery row per endpoint that wants it; the delivery job
//! ([`crate::jobs::deliver`]) sends them at least once, with retries for about three days.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::AnyConnection;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{Actor, Scope, ServiceError, ServiceResult, audit, workspaces};
use crate::clock::from_millis;
use crate::crypto::{self, Aad};
use crate::db::stmt::Exec;
use crate::db::webhooks::{DeliveryRow, EndpointRow, EventRow};
use crate::db::{self, new_id};
use crate::domain::FieldError;
use crate::net::TargetError;
use crate::state::App;

/// Every event type authlink sends.
pub const EVENT_TYPES: &[&str] = &[
    "connection.created",
    "connection.reconnected",
    "connection.refresh_failed",
    "connection.recovered",
    "connection.expiring",
    "connection.scopes_changed",
    "connection.broken",
    "connection.disconnected",
    "link.revoked",
    "link.rotated",
    "webhook.endpoint_disabled",
];

/// The retry schedule after the first attempt (seconds): about 75 hours in all, as the
/// Standard Webhooks specification suggests.
pub const RETRY_SCHEDULE_SECS: &[i64] = &[5, 300, 1800, 7200, 18_000, 36_000, 50_400, 72_000, 86_400];

/// How long the previous secret keeps signing after a rotation.
const PREVIOUS_SECRET_GRACE_MS: i64 = 24 * 3600 * 1000;

/// An endpoint as shown (never its secret).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EndpointView {
    /// Id.
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// Where events are POSTed.
    pub url: String,
    /// The event types it receives (`["*"]`: all).
    pub events: Vec<String>,
    /// Whether deliveries are made.
    pub enabled: bool,
    /// Why it was disabled.
    pub disabled_reason: Option<String>,
    /// A note.
    pub description: Option<String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// What a rotation does with the current secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Current {
    /// It keeps signing, as a second signature, for 24 hours, while receivers switch over.
    #[default]
    KeepsSigning,
    /// It stops signing now (it leaked), and so does any secret before it.
    StopsNow,
}

/// A new endpoint, or a rotated secret: the only time the secret is shown.
#[derive(Clone, Serialize, ToSchema)]
pub struct EndpointWithSecret {
    /// The endpoint.
    #[serde(flatten)]
    pub endpoint: EndpointView,
    /// The signing secret (`whsec_...`). Store it now: it cannot be shown again.
    pub secret: String,
}
redacted_debug!(EndpointWithSecret, shown: [endpoint], hidden: [secret]);

impl From<&EndpointRow> for EndpointView {
    fn from(e: &EndpointRow) -> Self {
        Self {
            id: e.id.clone(),
            workspace_id: e.workspace_id.clone(),
            url: e.url.clone(),
            events: e.events.split(',').map(str::to_string).collect(),
            enabled: e.enabled != 0,
            disabled_reason: e.disabled_reason.clone(),
            description: e.description.clone(),
            created_at: from_millis(e.created_at),
        }
    }
}

/// Most webhook endpoints a workspace has (removed ones not counted).
pub const MAX_ENDPOINTS: i64 = 20;

/// Input of [`create`].
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// The workspace; implied for workspace keys.
    pub workspace_id: Option<String>,
    /// An https URL (private and loopback addresses only with `webhooks.allow_private_targets`
    /// or inside `webhooks.private_networks`, and http only to such addresses; link-local and
    /// cloud metadata addresses never).
    pub url: String,
    /// Event types to receive; all when absent.
    pub events: Option<Vec<String>>,
    /// A note.
    #[schema(max_length = 200)]
    pub description: Option<String>,
}

/// Input of [`update`].
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointUpdate {
    /// New URL.
    pub url: Option<String>,
    /// New event filter.
    pub events: Option<Vec<String>>,
    /// Enable or disable deliveries.
    pub enabled: Option<bool>,
    /// New note.
    #[schema(max_length = 200)]
    pub description: Option<String>,
}

/// One delivery attempt in the log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AttemptView {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    /// The HTTP status received, if any.
    pub status_code: Option<i64>,
    /// How long it took.
    pub latency_ms: i64,
    /// `succeeded`, `failed` or `refused`.
    pub outcome: String,
    /// What went wrong.
    pub error: Option<String>,
}

/// A delivery with its attempts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryView {
    /// Id.
    pub id: String,
    /// The `webhook-id` (stable across retries and redeliveries).
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// The endpoint.
    pub endpoint_id: String,
    /// `pending`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// Attempts made in the current retry schedule (a manual redelivery starts a new one;
    /// `attempt_log` lists every attempt).
    pub attempts: i64,
    /// When the next attempt is due.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The last HTTP status.
    pub last_status_code: Option<i64>,
    /// Every attempt.
    pub attempt_log: Vec<AttemptView>,
}

fn secret_aad<'a>(workspace: &'a str, id: &'a str) -> Aad<'a> {
    Aad::new(workspace, "webhook_endpoints", id, "secret")
}

fn previous_secret_aad<'a>(workspace: &'a str, id: &'a str) -> Aad<'a> {
    Aad::new(workspace, "webhook_endpoints", id, "previous_secret")
}

/// A new signing secret: `whsec_` and base64 of 32 random bytes.
pub fn new_secret() -> String {
    format!("whsec_{}", STANDARD.encode(crypto::random_bytes::<32>()))
}

/// The Standard Webhooks signature of one message with one secret: `v1,<base64 HMAC-SHA256 of
/// "{id}.{timestamp}.{body}">`, the key being the base64-decoded part after `whsec_`.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap_or(secret)).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` header for an endpoint: one signature per valid secret, space-separated.
pub fn signature_header(
    app: &App,
    e: &EndpointRow,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> ServiceResult<String> {
    let mut sigs = Vec::new();
    let current = app.keys.open_str(&e.secret_sealed, secret_aad(&e.workspace_id, &e.id))?;
    sigs.extend(sign(current.expose_secret(), msg_id, timestamp, body));
    if let (Some(prev), Some(until)) = (&e.previous_secret_sealed, e.previous_secret_until)
        && until > app.now_ms()
    {
        let prev = app.keys.open_str(prev, previous_secret_aad(&e.workspace_id, &e.id))?;
        sigs.extend(sign(prev.expose_secret(), msg_id, timestamp, body));
    }
    Ok(sigs.join(" "))
}

fn parse_events(events: Option<&[String]>) -> Result<String, FieldError> {
    match events {
        None => Ok("*".into()),
        Some([]) => Err(FieldError::new("events", "name at least one event type, or omit the field for all")),
        Some(list) => {
            let mut out = Vec::new();
            for e in list {
                let e = e.trim();
                if e == "*" {
                    return Ok("*".into());
                }
                if !EVENT_TYPES.contains(&e) {
                    return Err(FieldError::new(
                        "events",
                        format!(
                            "unknown event type `{}` (known: {})",
                            crate::domain::truncate(e, 40),
                            EVENT_TYPES.join(", ")
                        ),
                    ));
                }
                if !out.contains(&e) {
                    out.push(e);
                }
            }
            Ok(out.join(","))
        }
    }
}

/// The longest wait for a webhook URL's host to resolve when it is saved.
const SAVE_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks an endpoint URL: absolute, https (or http with private targets allowed), no
/// credentials, and a host that resolves to allowed addresses only.
async fn check_url(app: &App, value: &str) -> Result<String, FieldError> {
    let url = url::Url::parse(value.trim()).map_err(|_| FieldError::new("url", "must be an absolute URL"))?;
    let plain = match url.scheme() {
        "https" => false,
        "http"
            if app.config.webhooks.allow_private_targets
                || !app.config.webhooks.private_networks.is_empty() =>
        {
            true
        }
        _ => return Err(FieldError::new("url", "must be an https URL")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FieldError::new("url", "must not contain a user name or password"));
    }
    if url.fragment().is_some() {
        return Err(FieldError::new("url", "must not contain a fragment"));
    }
    let host =
        url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| FieldError::new("url", "must have a host"))?;
    // The system resolver may wait long for a name server that does not answer; the request
    // is not held for it (nor is a thread of the lookup pool for long: lookups are bounded by
    // the resolver's own timeouts).
    match tokio::time::timeout(SAVE_LOOKUP_TIMEOUT, app.webhook_guard.check_host(host)).await {
        Ok(Ok(addrs)) if plain && !app.webhook_guard.admits_plain_http(&addrs) => Err(FieldError::new(
            "url",
            "must be an https URL (plain http only to a host in `webhooks.private_networks`)",
        )),
        Ok(Ok(_)) => Ok(url.to_string()),
        Ok(Err(e)) => {
            tracing::info!(error = ?e, "a webhook URL was refused");
            Err(FieldError::new("url", e.to_string()))
        }
        Err(_) => Err(FieldError::new("url", TargetError::Unresolvable.to_string())),
    }
}

async fn workspace_for(app: &App, scope: &Scope, requested: Option<&str>) -> ServiceResult<String> {
    let w =
        workspaces::for_new_object(app, scope, requested, "is required for platform-admin callers").await?;
    Ok(w.id)
}

/// Adds an endpoint; the answer holds its secret, shown this once.
pub async fn create(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    input: NewEndpoint,
) -> ServiceResult<EndpointWithSecret> {
    let workspace_id = workspace_for(app, scope, input.workspace_id.as_deref()).await?;
    let mut errors = super::Errors::default();
    let events = errors.take(parse_events(input.events.as_deref()));
    let url = errors.take(check_url(app, &input.url).await);
    let description = errors
        .take(crate::domain::parse_optional_label("description", input.description.as_deref()))
        .flatten();
    errors.finish()?;
    let (Some(events), Some(url)) = (events, url) else {
        return Err(FieldError::new("url", "is invalid").into());
    };
    let id = new_id();
    let secret = new_secret();
    let now = app.now_ms();
    let row = EndpointRow {
        secret_sealed: app.keys.seal_str(&secret, secret_aad(&workspace_id, &id)),
        id,
        workspace_id,
        url,
        previous_secret_sealed: None,
        previous_secret_until: None,
        events,
        enabled: 1,
        disabled_reason: None,
        description,
        created_at: now,
        updated_at: now,
    };
    let mut tx = app.db.begin_write().await?;
    // Every event is sent to every endpoint that wants it: their number is bounded.
    // (One creation at a time per workspace, so that two cannot both pass the limit.)
    db::advisory_lock(&mut tx, app.db.backend(), &format!("webhook endpoints:{}", row.workspace_id)).await?;
    if db::webhooks::count_live_endpoints(&mut tx, &row.workspace_id).await? >= MAX_ENDPOINTS {
        return Err(ServiceError::Conflict(format!(
            "a workspace has at most {MAX_ENDPOINTS} webhook endpoints; remove one first"
        )));
    }
    db::webhooks::insert_endpoint(&mut tx, &row).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "webhook.created",
        "webhook_endpoint",
        &row.id,
        serde_json::json!({"url": row.url, "events": row.events}),
    )
    .await?;
    tx.commit().await?;
    Ok(EndpointWithSecret { endpoint: EndpointView::from(&row), secret })
}

/// Loads an endpoint the caller may see (not a removed one).
pub async fn get_row(app: &App, scope: &Scope, id: &str) -> ServiceResult<EndpointRow> {
    match get_row_with_removed(app, scope, id).await? {
        e if e.is_removed() => Err(ServiceError::NotFound("webhook endpoint")),
        e => Ok(e),
    }
}

/// Loads an endpoint the caller may see, a removed one included: nothing can be done with a
/// removed endpoint any more, but its delivery log stays readable.
pub async fn get_row_with_removed(app: &App, scope: &Scope, id: &str) -> ServiceResult<EndpointRow> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("webhook endpoint"));
    }
    let mut conn = app.db.read().await?;
    match db::webhooks::get_endpoint(&mut conn, id).await? {
        Some(e) if scope.allows(&e.workspace_id) => Ok(e),
        _ => Err(ServiceError::NotFound("webhook endpoint")),
    }
}

/// The endpoint as it stands in the write transaction `tx`, locked there for the change.
async fn locked_row(
    app: &App,
    tx: &mut sqlx::AnyConnection,
    scope: &Scope,
    id: &str,
) -> ServiceResult<EndpointRow> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("webhook endpoint"));
    }
    match db::webhooks::get_endpoint_for_update(tx, app.db.backend(), id).await? {
        Some(e) if scope.allows(&e.workspace_id) && !e.is_removed() => Ok(e),
        _ => Err(ServiceError::NotFound("webhook endpoint")),
    }
}

/// Endpoints visible to the caller.
pub async fn list(app: &App, scope: &Scope, workspace_id: Option<&str>) -> ServiceResult<Vec<EndpointView>> {
    list_where(app, scope, workspace_id, false).await
}

/// Removed endpoints visible to the caller, whose delivery logs stay readable.
pub async fn list_removed(
    app: &App,
    scope: &Scope,
    workspace_id: Option<&str>,
) -> ServiceResult<Vec<EndpointView>> {
    list_where(app, scope, workspace_id, true).await
}

async fn list_where(
    app: &App,
    scope: &Scope,
    workspace_id: Option<&str>,
    removed: bool,
) -> ServiceResult<Vec<EndpointView>> {
    let mut conn = app.db.read().await?;
    let workspace = scope.listing_workspace(&mut conn, workspace_id).await?;
    Ok(db::webhooks::list_endpoints(&mut conn, workspace.as_deref())
        .await?
        .iter()
        .filter(|e| e.is_removed() == removed)
        .map(EndpointView::from)
        .collect())
}

/// Changes URL, events, enabled flag or note.
pub async fn update(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    id: &str,
    input: EndpointUpdate,
) -> ServiceResult<EndpointView> {
    get_row(app, scope, id).await?;
    // Checked before the transaction (the URL check resolves its host), applied in it to the
    // endpoint as it stands then.
    let mut errors = super::Errors::default();
    let url = match &input.url {
        Some(url) => errors.take(check_url(app, url).await),
        None => None,
    };
    let events = input.events.as_ref().and_then(|e| errors.take(parse_events(Some(e))));
    let description = input
        .description
        .as_ref()
        .map(|d| errors.take(crate::domain::parse_optional_label("description", Some(d))).flatten());
    errors.finish()?;
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let mut row = locked_row(app, &mut tx, scope, id).await?;
    if let Some(u) = url {
        row.url = u;
    }
    if let Some(e) = events {
        row.events = e;
    }
    if let Some(d) = description {
        row.description = d;
    }
    if let Some(enabled) = input.enabled {
        row.enabled = i64::from(enabled);
        row.disabled_reason = if enabled { None } else { Some("Disabled by the agency.".into()) };
    }
    row.updated_at = now;
    db::webhooks::update_endpoint(&mut tx, &row).await?;
    if row.enabled == 0 {
        db::webhooks::cancel_pending(&mut tx, &row.id, now).await?;
    }
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "webhook.updated",
        "webhook_endpoint",
        &row.id,
        serde_json::json!({"url": row.url, "events": row.events, "enabled": row.enabled != 0}),
    )
    .await?;
    tx.commit().await?;
    Ok(EndpointView::from(&row))
}

/// Removes an endpoint: disabled for good, pending deliveries cancelled, its log kept.
pub async fn remove(app: &App, actor: &Actor, scope: &Scope, id: &str) -> ServiceResult<EndpointView> {
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let mut row = locked_row(app, &mut tx, scope, id).await?;
    row.enabled = 0;
    row.disabled_reason = Some("Removed.".into());
    // The answer shows the events it was subscribed to, not the stored marker of removal.
    let view = EndpointView::from(&row);
    row.events = EndpointRow::REMOVED.into();
    // Its secrets sign nothing any more: erased now (an empty value is an erased one), not kept
    // until the row goes with its delivery log.
    row.secret_sealed = String::new();
    row.previous_secret_sealed = None;
    row.previous_secret_until = None;
    row.updated_at = now;
    db::webhooks::update_endpoint(&mut tx, &row).await?;
    db::webhooks::cancel_pending(&mut tx, &row.id, now).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "webhook.removed",
        "webhook_endpoint",
        &row.id,
        serde_json::json!({"url": row.url}),
    )
    .await?;
    tx.commit().await?;
    Ok(view)
}

/// Rotates the signing secret; the previous one keeps signing (as a second signature) for a day.
pub async fn rotate_secret(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    id: &str,
    current: Current,
) -> ServiceResult<EndpointWithSecret> {
    let secret = new_secret();
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let mut row = locked_row(app, &mut tx, scope, id).await?;
    match current {
        Current::KeepsSigning => {
            // The secret before the last rotation still signs, for receivers not yet given the
            // new one; a second rotation now would drop it at once and fail their deliveries.
            if let Some(until) = row.previous_secret_until.filter(|until| *until > now) {
                let at = from_millis(until)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                return Err(ServiceError::Conflict(format!(
                    "the secret was rotated less than a day ago and the one before it signs until {at}; rotate \
                     again after that, or, if a secret leaked, rotate so that the current one stops signing now"
                )));
            }
            let old = app.keys.open_str(&row.secret_sealed, secret_aad(&row.workspace_id, &row.id))?;
            row.previous_secret_sealed =
                Some(app.keys.seal_str(old.expose_secret(), previous_secret_aad(&row.workspace_id, &row.id)));
            row.previous_secret_until = Some(now + PREVIOUS_SECRET_GRACE_MS);
        }
        // A leaked secret: only the new one signs from now on, the one before it neither.
        Current::StopsNow => {
            row.previous_secret_sealed = None;
            row.previous_secret_until = None;
        }
    }
    row.secret_sealed = app.keys.seal_str(&secret, secret_aad(&row.workspace_id, &row.id));
    row.updated_at = now;
    db::webhooks::update_endpoint(&mut tx, &row).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "webhook.secret_rotated",
        "webhook_endpoint",
        &row.id,
        serde_json::json!({"current_stops": match current {
            Current::KeepsSigning => "in 24 hours",
            Current::StopsNow => "now",
        }}),
    )
    .await?;
    tx.commit().await?;
    Ok(EndpointWithSecret { endpoint: EndpointView::from(&row), secret })
}

/// Writes an event to the outbox, with a delivery for every enabled endpoint of the workspace
/// that wants it, on `conn` (inside the caller's transaction). Returns the event id.
pub async fn emit(
    conn: &mut impl Exec,
    app: &App,
    now_ms: i64,
    workspace_id: &str,
    event_type: &str,
    data: serde_json::Value,
) -> ServiceResult<()> {
    emit_to(conn, &app.keys, now_ms, workspace_id, event_type, data, None).await?;
    Ok(())
}

/// Where an event's payload is sealed: payloads carry repair links, which are capabilities.
pub fn payload_aad<'a>(workspace: &'a str, event_id: &'a str) -> Aad<'a> {
    Aad::new(workspace, "webhook_events", event_id, "payload")
}

async fn emit_to(
    conn: &mut impl Exec,
    keys: &crate::crypto::KeyRing,
    now_ms: i64,
    workspace_id: &str,
    event_type: &str,
    data: serde_json::Value,
    only_endpoint: Option<&str>,
) -> ServiceResult<String> {
    let endpoints = endpoints_for(conn, workspace_id, event_type, only_endpoint).await?;
    enqueue(conn, keys, now_ms, workspace_id, event_type, data, endpoints).await
}

/// The endpoints an event of `event_type` goes to (`only_endpoint`: that one, whatever it
/// wants). When there are none, nothing needs to be built for it.
pub async fn endpoints_for(
    conn: &mut impl Exec,
    workspace_id: &str,
    event_type: &str,
    only_endpoint: Option<&str>,
) -> ServiceResult<Vec<db::webhooks::EndpointRow>> {
    Ok(db::webhooks::list_endpoints(conn, Some(workspace_id))
        .await?
        .into_iter()
        .filter(|endpoint| match only_endpoint {
            Some(only) => endpoint.id == only,
            None => endpoint.enabled != 0 && endpoint.wants(event_type),
        })
        .collect())
}

/// Puts an event in the outbox for `endpoints` (from [`endpoints_for`]); returns its id.
pub async fn enqueue(
    conn: &mut impl Exec,
    keys: &crate::crypto::KeyRing,
    now_ms: i64,
    workspace_id: &str,
    event_type: &str,
    data: serde_json::Value,
    endpoints: Vec<db::webhooks::EndpointRow>,
) -> ServiceResult<String> {
    let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
    if endpoints.is_empty() {
        // Nothing to deliver: the outbox holds events on their way to an endpoint, and an
        // endpoint added later receives only what happens after it.
        return Ok(id);
    }
    let timestamp =
        from_millis(now_ms).format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let payload = serde_json::json!({ "type": event_type, "timestamp": timestamp, "data": data });
    db::webhooks::insert_event(
        conn,
        &EventRow {
            id: id.clone(),
            workspace_id: workspace_id.to_string(),
            event_type: event_type.to_string(),
            payload: keys.seal_str(&payload.to_string(), payload_aad(workspace_id, &id)),
            created_at: now_ms,
        },
    )
    .await?;
    for endpoint in endpoints {
        db::webhooks::insert_delivery(
            conn,
            &DeliveryRow {
                id: new_id(),
                event_id: id.clone(),
                endpoint_id: endpoint.id.clone(),
                workspace_id: workspace_id.to_string(),
                status: "pending".into(),
                attempts: 0,
                next_attempt_at: Some(now_ms),
                lease_owner: None,
                lease_until: None,
                last_status_code: None,
                last_error: None,
                created_at: now_ms,
                updated_at: now_ms,
            },
        )
        .await?;
    }
    Ok(id)
}

/// Sends a `webhook.test` event to one endpoint (delivered by the delivery job like any other).
pub async fn send_test(app: &App, actor: &Actor, scope: &Scope, id: &str) -> ServiceResult<String> {
    let row = get_row(app, scope, id).await?;
    if row.enabled == 0 {
        // It would be queued and never sent.
        return Err(ServiceError::Conflict("the endpoint is disabled; enable it first".into()));
    }
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let event_id = emit_to(
        &mut tx,
        &app.keys,
        now,
        &row.workspace_id,
        "webhook.test",
        serde_json::json!({"endpoint_id": row.id, "message": "This is a test event from authlink."}),
        Some(&row.id),
    )
    .await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "webhook.tested",
        "webhook_endpoint",
        &row.id,
        serde_json::json!({"event_id": event_id}),
    )
    .await?;
    tx.commit().await?;
    Ok(event_id)
}

/// The delivery log of an endpoint, newest first; a removed endpoint's too.
pub async fn deliveries(
    app: &App,
    scope: &Scope,
    endpoint_id: &str,
    before: Option<&str>,
    limit: i64,
) -> ServiceResult<Vec<DeliveryView>> {
    let endpoint = get_row_with_removed(app, scope, endpoint_id).await?;
    let mut conn = app.db.read().await?;
    let rows = db::webhooks::list_deliveries(&mut conn, &endpoint.id, before, limit).await?;
    let mut out = Vec::with_capacity(rows.len());
    for d in rows {
        out.push(delivery_view(&mut conn, d).await?);
    }
    Ok(out)
}

async fn delivery_view(conn: &mut AnyConnection, d: DeliveryRow) -> ServiceResult<DeliveryView> {
    let event_type =
        db::webhooks::get_event(conn, &d.event_id).await?.map(|e| e.event_type).unwrap_or_default();
    let attempt_log = db::webhooks::attempts(conn, &d.id)
        .await?
        .into_iter()
        .map(|a| AttemptView {
            at: from_millis(a.attempted_at),
            status_code: a.status_code,
            latency_ms: a.latency_ms,
            outcome: a.outcome,
            error: a.error,
        })
        .collect();
    Ok(DeliveryView {
        id: d.id,
        event_id: d.event_id,
        event_type,
        endpoint_id: d.endpoint_id,
        status: d.status,
        attempts: d.attempts,
        next_attempt_at: d.next_attempt_at.map(from_millis),
        last_status_code: d.last_status_code,
        attempt_log,
    })
}

/// Delivers an event again (same `webhook-id`), now, whatever happened before, with a fresh
/// retry schedule: the delivery's attempt count starts over (its attempt log keeps every
/// attempt), so a redelivery that fails is retried like a new delivery rather than failing for
/// good and disabling the endpoint.
pub async fn redeliver(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    delivery_id: &str,
) -> ServiceResult<DeliveryView> {
    if !db::is_id(delivery_id) {
        return Err(ServiceError::NotFound("delivery"));
    }
    let mut tx = app.db.begin_write().await?;
    let Some(mut d) = db::webhooks::get_delivery(&mut tx, delivery_id).await? else {
        return Err(ServiceError::NotFound("delivery"));
    };
    if !scope.allows(&d.workspace_id) {
        return Err(ServiceError::NotFound("delivery"));
    }
    let endpoint = db::webhooks::get_endpoint(&mut tx, &d.endpoint_id)
        .await?
        .filter(|e| !e.is_removed())
        .ok_or(ServiceError::NotFound("delivery"))?;
    if endpoint.enabled == 0 {
        return Err(ServiceError::Conflict("the endpoint is disabled; enable it first".into()));
    }
    // A fresh attempt sequence: with the old count, a delivery that had used up its retries
    // would fail for good (and disable its endpoint) after one more failed attempt.
    let now = app.now_ms();
    // An attempt running now would go on beside a second one (the same message twice at once,
    // past the endpoint's limit of attempts in flight), and its answer would be lost.
    if !db::webhooks::restart_delivery(&mut tx, &d.id, now).await? {
        return Err(ServiceError::Conflict(
            "an attempt of this delivery is under way; redeliver it once it has ended".into(),
        ));
    }
    d.status = "pending".into();
    d.attempts = 0;
    d.next_attempt_at = Some(now);
    d.lease_owner = None;
    d.lease_until = None;
    d.updated_at = now;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&d.workspace_id),
        "webhook.redelivered",
        "webhook_delivery",
        &d.id,
        serde_json::json!({"event_id": d.event_id}),
    )
    .await?;
    tx.commit().await?;
    let mut conn = app.db.read().await?;
    delivery_view(&mut conn, d).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_known_answer() {
        // From the Standard Webhooks specification's test suite (security.md §4).
        let sig = sign(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(sig.as_deref(), Some("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="));
    }

    #[test]
    fn secrets_have_the_standard_shape() {
        let s = new_secret();
        assert!(s.starts_with("whsec_"));
        let key = STANDARD.decode(&s[6..]).unwrap();
        assert_eq!(key.len(), 32);
        assert_ne!(s, new_secret());
    }

    #[test]
    fn event_filters() {
        assert_eq!(parse_events(None).unwrap(), "*");
        assert_eq!(
            parse_events(Some(&["connection.broken".into(), "link.revoked".into()])).unwrap(),
            "connection.broken,link.revoked"
        );
        assert!(parse_events(Some(&["connection.exploded".into()])).is_err());
        assert!(parse_events(Some(&[])).is_err());
    }
}
