//! Auth links: create, read, update, revoke, rotate, and resolve a token from the public page.

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{Actor, Errors, Scope, ServiceError, ServiceResult, audit, workspaces};
use crate::clock::{from_millis, to_millis};
use crate::crypto::{self, Aad};
use crate::db::links::{LinkFilter, LinkRow};
use crate::db::workspaces::WorkspaceRow;
use crate::db::{self, new_id};
use crate::domain::{self, FieldError, Platform};
use crate::state::App;

/// Whether a link can still be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkStatus {
    /// Clients can connect through it.
    Active,
    /// Revoked by the agency.
    Revoked,
    /// Past its expiry time.
    Expired,
    /// Its maximum number of connections is reached: it only repairs the accounts it connected.
    UsedUp,
}

impl LinkStatus {
    /// The status of `row` at `now_ms`.
    pub fn of(row: &LinkRow, now_ms: i64) -> Self {
        Self::from_parts(row.revoked_at, row.expires_at, row.max_uses, row.use_count, now_ms)
    }

    /// The status of a link with these fields at `now_ms`.
    pub fn from_parts(
        revoked_at: Option<i64>,
        expires_at: Option<i64>,
        max_uses: Option<i64>,
        use_count: i64,
        now_ms: i64,
    ) -> Self {
        if revoked_at.is_some() {
            LinkStatus::Revoked
        } else if expires_at.is_some_and(|e| e <= now_ms) {
            LinkStatus::Expired
        } else if max_uses.is_some_and(|m| use_count >= m) {
            LinkStatus::UsedUp
        } else {
            LinkStatus::Active
        }
    }

    /// Whether the link still repairs the accounts it connected: while it is active, and once
    /// used up (`max_uses` limits the accounts, not their repairs), but not revoked or expired.
    pub fn repairs(self) -> bool {
        matches!(self, LinkStatus::Active | LinkStatus::UsedUp)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkStatus::Active => "active",
            LinkStatus::Revoked => "revoked",
            LinkStatus::Expired => "expired",
            LinkStatus::UsedUp => "used_up",
        }
    }
}

/// A link as the API and the CLI show it.
#[derive(Clone, Serialize, ToSchema)]
pub struct LinkView {
    /// Id.
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// Normally the client's name.
    #[schema(min_length = 1)]
    pub label: String,
    /// The agency's own reference for the client.
    pub client_ref: Option<String>,
    /// Platforms offered.
    pub platforms: Vec<Platform>,
    /// The full link to send to the client.
    pub url: String,
    /// Whether it can be used now.
    pub status: LinkStatus,
    /// Expiry.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    /// Most successful connections; once reached, the link still reconnects the accounts it
    /// connected (each repair counts too), but connects no new account.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_uses: Option<i64>,
    /// Where clients are sent after connecting.
    pub redirect_url: Option<String>,
    /// Successful connections through it.
    pub use_count: i64,
    /// Last successful connection.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
    /// Who created it (`cli`, `api_key:<id>`, `user:<id>`).
    pub created_by: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// Revocation time.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
    /// Last token rotation.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub rotated_at: Option<OffsetDateTime>,
    /// The landing page does not list the accounts connected through this link.
    pub hide_connections: bool,
}
redacted_debug!(
    LinkView,
    shown: [id, workspace_id, label, client_ref, platforms, status, expires_at, max_uses, redirect_url, use_count,
        last_used_at, created_by, created_at, updated_at, revoked_at, rotated_at, hide_connections],
    hidden: [url],
);

/// Input of [`create`].
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewLink {
    /// The workspace; required for platform-admin keys, implied for workspace keys.
    pub workspace_id: Option<String>,
    /// Normally the client's name.
    #[schema(max_length = 200)]
    pub label: String,
    /// The agency's own reference for the client.
    #[schema(max_length = 200)]
    pub client_ref: Option<String>,
    /// Platforms offered; every enabled platform when absent.
    #[schema(value_type = Option<Vec<Platform>>)]
    pub platforms: Option<Vec<String>>,
    /// Lifetime from now, like `30d` or `12h`.
    pub expires_in: Option<String>,
    /// Absolute expiry (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    /// Most successful connections; once reached, the link still reconnects the accounts it
    /// connected (each repair counts too), but connects no new account.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_uses: Option<i64>,
    /// Where clients go after connecting; must match the workspace's allow-list.
    pub redirect_url: Option<String>,
    /// Hide the list of connected accounts on the landing page (for links shared with many
    /// people). Default: shown.
    pub hide_connections: Option<bool>,
}

/// Input of [`update`]. Absent fields stay; `null` clears the optional ones.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkUpdate {
    /// New label.
    #[schema(max_length = 200)]
    pub label: Option<String>,
    /// New client reference (`null` clears it).
    #[serde(default, deserialize_with = "double_option")]
    #[schema(max_length = 200, value_type = Option<String>)]
    pub client_ref: Option<Option<String>>,
    /// New expiry (`null` removes it), at most ten years away.
    #[serde(default, deserialize_with = "double_option_time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Option<OffsetDateTime>>,
    /// New lifetime from now, like `30d` or `12h` (at most ten years); instead of `expires_at`.
    pub expires_in: Option<String>,
    /// New success redirect (`null` removes it).
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub redirect_url: Option<Option<String>>,
    /// Hide or show the list of connected accounts on the landing page.
    pub hide_connections: Option<bool>,
    /// New platforms offered (replaces the list). Accounts already connected stay connected.
    #[schema(value_type = Option<Vec<Platform>>)]
    pub platforms: Option<Vec<String>>,
    /// New use limit (`null` removes it). A limit at or below the uses so far makes the link
    /// used up: it then only repairs the accounts it connected.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1_000_000)]
    pub max_uses: Option<Option<i64>>,
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value.
fn double_option<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::<T>::deserialize(d)?))
}

fn double_option_time<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<OffsetDateTime>>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(with = "time::serde::rfc3339::option")] Option<OffsetDateTime>);
    Ok(Some(Wrap::deserialize(d)?.0))
}

/// Where a link's token is sealed.
pub(crate) fn token_aad<'a>(workspace: &'a str, id: &'a str) -> Aad<'a> {
    Aad::new(workspace, "links", id, "token")
}

/// The public URL of a link token.
pub fn url_for(app: &App, token: &str) -> String {
    app.config.public(&format!("/l/{token}"))
}

/// Builds the view of `row`, unsealing its token to show the URL.
pub fn view(app: &App, row: &LinkRow) -> ServiceResult<LinkView> {
    let token = app.keys.open_str(&row.token_sealed, token_aad(&row.workspace_id, &row.id))?;
    let now = app.now_ms();
    Ok(LinkView {
        id: row.id.clone(),
        workspace_id: row.workspace_id.clone(),
        label: row.label.clone(),
        client_ref: row.client_ref.clone(),
        platforms: domain::platforms_from_db(&row.platforms),
        url: url_for(app, token.expose_secret()),
        status: LinkStatus::of(row, now),
        expires_at: row.expires_at.map(from_millis),
        max_uses: row.max_uses,
        redirect_url: row.redirect_url.clone(),
        use_count: row.use_count,
        last_used_at: row.last_used_at.map(from_millis),
        created_by: row.created_by.clone(),
        created_at: from_millis(row.created_at),
        updated_at: from_millis(row.updated_at),
        revoked_at: row.revoked_at.map(from_millis),
        rotated_at: row.rotated_at.map(from_millis),
        hide_connections: row.hide_connections != 0,
    })
}

fn parse_platforms(app: &App, input: Option<&[String]>) -> Result<Vec<Platform>, FieldError> {
    let enabled = app.config.enabled_platforms();
    let Some(list) = input else {
        if enabled.is_empty() {
            return Err(FieldError::new("platforms", "no platform is enabled on this instance"));
        }
        return Ok(enabled);
    };
    if list.is_empty() {
        return Err(FieldError::new("platforms", "must name at least one platform"));
    }
    let mut out = Vec::new();
    for p in list {
        let platform: Platform = p.parse()?;
        if !enabled.contains(&platform) {
            return Err(FieldError::new(
                "platforms",
                format!("{} is not enabled on this instance", platform.display_name()),
            ));
        }
        if !out.contains(&platform) {
            out.push(platform);
        }
    }
    out.sort();
    Ok(out)
}

/// Creates a link and returns its view (whose `url` holds the token).
pub async fn create(app: &App, actor: &Actor, scope: &Scope, input: NewLink) -> ServiceResult<LinkView> {
    let workspace = workspaces::for_new_object(
        app,
        scope,
        input.workspace_id.as_deref(),
        "is required for platform-admin callers",
    )
    .await?;
    let now = app.now();
    let mut errors = Errors::default();
    let label = errors.take(domain::parse_label("label", &input.label));
    let client_ref =
        errors.take(domain::parse_optional_label("client_ref", input.client_ref.as_deref())).flatten();
    let platforms = errors.take(parse_platforms(app, input.platforms.as_deref()));
    let expires_at =
        errors.take(domain::parse_expiry(now, input.expires_in.as_deref(), input.expires_at)).flatten();
    let max_uses = input.max_uses.and_then(|m| errors.take(domain::parse_max_uses(m)));
    let redirect_url = input
        .redirect_url
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .and_then(|u| errors.take(domain::parse_success_redirect(u, &workspace.allow_list())))
        .map(|u| u.to_string());
    errors.finish()?;
    let (Some(label), Some(platforms)) = (label, platforms) else {
        return Err(FieldError::new("label", "is invalid").into());
    };

    let id = new_id();
    let token = crypto::random_token();
    let now_ms = to_millis(now);
    let row = LinkRow {
        token_hash: crypto::sha256_hex(token.as_bytes()),
        token_sealed: app.keys.seal_str(&token, token_aad(&workspace.id, &id)),
        id,
        workspace_id: workspace.id.clone(),
        label,
        client_ref,
        platforms: domain::platforms_to_db(&platforms),
        expires_at: expires_at.map(to_millis),
        max_uses,
        redirect_url,
        created_by: actor.label(),
        created_at: now_ms,
        updated_at: now_ms,
        revoked_at: None,
        rotated_at: None,
        last_used_at: None,
        use_count: 0,
        hide_connections: i64::from(input.hide_connections.unwrap_or(false)),
    };
    let mut tx = app.db.begin_write().await?;
    db::links::insert(&mut tx, &row).await?;
    audit::record(
        &mut tx,
        now_ms,
        actor,
        Some(&row.workspace_id),
        "link.created",
        "link",
        &row.id,
        serde_json::json!({"label": row.label, "platforms": platforms}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(link_id = %row.id, workspace_id = %row.workspace_id, "link created");
    view(app, &row)
}

/// Loads a link the caller may see.
pub async fn get_row(app: &App, scope: &Scope, id: &str) -> ServiceResult<LinkRow> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("link"));
    }
    let mut conn = app.db.read().await?;
    match db::links::get(&mut conn, id).await? {
        Some(l) if scope.allows(&l.workspace_id) => Ok(l),
        _ => Err(ServiceError::NotFound("link")),
    }
}

/// One link.
pub async fn get(app: &App, scope: &Scope, id: &str) -> ServiceResult<LinkView> {
    view(app, &get_row(app, scope, id).await?)
}

/// Filters of [`list`].
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    /// Only this workspace.
    pub workspace_id: Option<String>,
    /// Substring of label or client reference.
    pub search: Option<String>,
    /// Links older than this id.
    pub before: Option<String>,
    /// Page size.
    pub limit: i64,
}

/// Links visible to the caller, newest first.
pub async fn list(app: &App, scope: &Scope, q: &ListQuery) -> ServiceResult<Vec<LinkView>> {
    let mut conn = app.db.read().await?;
    let workspace = scope.listing_workspace(&mut conn, q.workspace_id.as_deref()).await?;
    let rows = db::links::list(
        &mut conn,
        &LinkFilter {
            workspace_id: workspace.as_deref(),
            search: q.search.as_deref().filter(|s| !s.is_empty()),
            active: None,
            before: q.before.as_deref(),
        },
        q.limit,
    )
    .await?;
    rows.iter().map(|r| view(app, r)).collect()
}

/// Changes label, client reference, expiry or redirect.
pub async fn update(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    id: &str,
    input: LinkUpdate,
) -> ServiceResult<LinkView> {
    let current = get_row(app, scope, id).await?;
    // Checked first, applied in the transaction to the link as it stands then.
    let mut errors = Errors::default();
    let mut changed = Vec::new();
    let label = input.label.as_ref().and_then(|label| errors.take(domain::parse_label("label", label)));
    let client_ref = input
        .client_ref
        .as_ref()
        .and_then(|c| errors.take(domain::parse_optional_label("client_ref", c.as_deref())));
    let expires_at = match (input.expires_at, input.expires_in.as_deref()) {
        // `null`: no expiry any more (with a lifetime too, the two disagree).
        (Some(None), None) => Some(None),
        (Some(None), Some(_)) => {
            errors.push(FieldError::new("expires_in", "give expires_in or expires_at, not both"));
            None
        }
        (at, expires_in) => errors
            .take(domain::parse_expiry(app.now(), expires_in, at.flatten()))
            .flatten()
            .map(|at| Some(to_millis(at))),
    };
    let redirect_url = match &input.redirect_url {
        None => None,
        Some(redirect) => match redirect.as_deref().filter(|s| !s.trim().is_empty()) {
            None => Some(None),
            Some(u) => {
                let workspace = workspaces::get_row(app, &Scope::Admin, &current.workspace_id).await?;
                errors
                    .take(domain::parse_success_redirect(u, &workspace.allow_list()))
                    .map(|u| Some(u.to_string()))
            }
        },
    };
    let platforms = input.platforms.as_deref().and_then(|p| errors.take(parse_platforms(app, Some(p))));
    let max_uses = match input.max_uses {
        Some(Some(m)) => errors.take(domain::parse_max_uses(m)).map(Some),
        Some(None) => Some(None),
        None => None,
    };
    errors.finish()?;
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let mut row = locked_row(app, &mut tx, scope, id).await?;
    if let Some(p) = platforms {
        row.platforms = domain::platforms_to_db(&p);
        changed.push("platforms");
    }
    if let Some(m) = max_uses {
        row.max_uses = m;
        changed.push("max_uses");
    }
    if let Some(l) = label {
        row.label = l;
        changed.push("label");
    }
    if let Some(c) = client_ref {
        row.client_ref = c;
        changed.push("client_ref");
    }
    if let Some(at) = expires_at {
        row.expires_at = at;
        changed.push("expires_at");
    }
    if let Some(u) = redirect_url {
        row.redirect_url = u;
        changed.push("redirect_url");
    }
    if let Some(hide) = input.hide_connections {
        row.hide_connections = i64::from(hide);
        changed.push("hide_connections");
    }
    row.updated_at = now;
    db::links::update(&mut tx, &row).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "link.updated",
        "link",
        &row.id,
        serde_json::json!({"fields": changed}),
    )
    .await?;
    tx.commit().await?;
    view(app, &row)
}

/// The link as it stands in the write transaction `tx`, locked there for the change.
async fn locked_row(
    app: &App,
    tx: &mut sqlx::AnyConnection,
    scope: &Scope,
    id: &str,
) -> ServiceResult<LinkRow> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("link"));
    }
    match db::links::get_for_update(tx, app.db.backend(), id).await? {
        Some(l) if scope.allows(&l.workspace_id) => Ok(l),
        _ => Err(ServiceError::NotFound("link")),
    }
}

/// Revokes a link: dead at once. Revoking twice is harmless.
pub async fn revoke(app: &App, actor: &Actor, scope: &Scope, id: &str) -> ServiceResult<LinkView> {
    let mut tx = app.db.begin_write().await?;
    let mut row = locked_row(app, &mut tx, scope, id).await?;
    if row.revoked_at.is_none() {
        let now = app.now_ms();
        row.revoked_at = Some(now);
        row.updated_at = now;
        db::links::update(&mut tx, &row).await?;
        audit::record(
            &mut tx,
            now,
            actor,
            Some(&row.workspace_id),
            "link.revoked",
            "link",
            &row.id,
            serde_json::json!({}),
        )
        .await?;
        let data = link_event_data(app, &row)?;
        super::webhooks::emit(&mut tx, app, now, &row.workspace_id, "link.revoked", data).await?;
        tx.commit().await?;
        tracing::info!(link_id = %row.id, "link revoked");
    }
    view(app, &row)
}

/// Gives a link a new token; the old one is dead at once. The id and history stay.
pub async fn rotate(app: &App, actor: &Actor, scope: &Scope, id: &str) -> ServiceResult<LinkView> {
    let mut tx = app.db.begin_write().await?;
    let mut row = locked_row(app, &mut tx, scope, id).await?;
    if row.revoked_at.is_some() {
        return Err(ServiceError::Conflict("a revoked link cannot be rotated; create a new one".into()));
    }
    let token = crypto::random_token();
    let now = app.now_ms();
    row.token_hash = crypto::sha256_hex(token.as_bytes());
    row.token_sealed = app.keys.seal_str(&token, token_aad(&row.workspace_id, &row.id));
    row.rotated_at = Some(now);
    row.updated_at = now;
    db::links::update(&mut tx, &row).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "link.rotated",
        "link",
        &row.id,
        serde_json::json!({}),
    )
    .await?;
    let data = link_event_data(app, &row)?;
    super::webhooks::emit(&mut tx, app, now, &row.workspace_id, "link.rotated", data).await?;
    tx.commit().await?;
    tracing::info!(link_id = %row.id, "link rotated");
    view(app, &row)
}

/// The `data` of a link webhook: the link as the API shows it (with its current URL).
fn link_event_data(app: &App, row: &LinkRow) -> ServiceResult<serde_json::Value> {
    Ok(serde_json::to_value(view(app, row)?).unwrap_or(serde_json::Value::Null))
}

/// What the landing page finds for a token: the link with its status (`None`: unknown or
/// malformed token).
pub async fn resolve_public(
    app: &App,
    token: &str,
) -> ServiceResult<Option<(db::links::PublicLinkRow, LinkStatus)>> {
    if !token_well_formed(token) {
        return Ok(None);
    }
    let hash = crypto::sha256_hex(token.as_bytes());
    let mut conn = app.db.read_fast().await?;
    let Some(link) = db::links::public_by_token_hash(&mut conn, &hash).await? else { return Ok(None) };
    drop(conn);
    let status =
        LinkStatus::from_parts(link.revoked_at, link.expires_at, link.max_uses, link.use_count, app.now_ms());
    Ok(Some((link, status)))
}

/// What a public link token resolves to.
#[derive(Debug)]
pub enum Resolved {
    /// No link has this token (or the token is malformed).
    Unknown,
    /// The link exists but cannot be used.
    Gone {
        /// Why.
        status: LinkStatus,
        /// The workspace, for branding the page.
        workspace: Box<WorkspaceRow>,
    },
    /// The link can be used.
    Usable {
        /// The link.
        link: Box<LinkRow>,
        /// Its workspace.
        workspace: Box<WorkspaceRow>,
        /// The link is used up: it can only repair the accounts it connected (checked when the
        /// account is known, at the callback).
        repair_only: bool,
    },
}

/// Whether `token` has the shape of one of our tokens (43 base64url characters).
pub fn token_well_formed(token: &str) -> bool {
    token.len() == 43 && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Resolves a token from a public URL, read-only.
pub async fn resolve(app: &App, token: &str) -> ServiceResult<Resolved> {
    if !token_well_formed(token) {
        return Ok(Resolved::Unknown);
    }
    let hash = crypto::sha256_hex(token.as_bytes());
    let mut conn = app.db.read_fast().await?;
    let Some((link, workspace)) = db::links::get_with_workspace_by_token_hash(&mut conn, &hash).await? else {
        return Ok(Resolved::Unknown);
    };
    let status = LinkStatus::of(&link, app.now_ms());
    if matches!(status, LinkStatus::Active | LinkStatus::UsedUp) {
        let repair_only = status == LinkStatus::UsedUp;
        Ok(Resolved::Usable { link: Box::new(link), workspace: Box::new(workspace), repair_only })
    } else {
        Ok(Resolved::Gone { status, workspace: Box::new(workspace) })
    }
}
