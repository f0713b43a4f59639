//! Connections: the result of a successful connect flow, their tokens and their history.
//!
//! A connection is keyed by (workspace, provider, provider account id): connecting the same
//! account again, through any link of the workspace, updates the existing row (new tokens, status
//! `active`, reconnect count + 1) instead of making a duplicate.

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::links::LinkStatus;
use super::{Actor, Scope, ServiceError, ServiceResult, audit};
use crate::clock::{from_millis, to_millis};
use crate::crypto::Aad;
use crate::db::connections::{ConnectionFilter, ConnectionRow, EventRow};
use crate::db::links::LinkRow;
use crate::db::stmt::Exec;
use crate::db::{self, new_id};
use crate::domain::Platform;
use crate::providers::{Mode, Profile, ProviderError, TokenSet};
use crate::state::{App, AppState};

/// The state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionStatus {
    /// Tokens work.
    Active,
    /// The grant is dead; the client must reconnect through a link.
    Broken,
    /// Removed by the agency or the client.
    Disconnected,
}

impl ConnectionStatus {
    /// The database and wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Active => "active",
            ConnectionStatus::Broken => "broken",
            ConnectionStatus::Disconnected => "disconnected",
        }
    }

    /// Parses the database form (unknown values read as broken, the safe side).
    pub fn parse(s: &str) -> Self {
        match s {
            "active" => ConnectionStatus::Active,
            "disconnected" => ConnectionStatus::Disconnected,
            _ => ConnectionStatus::Broken,
        }
    }
}

/// A connection as the API and the CLI show it. Never holds a token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectionView {
    /// Id.
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// The link it was last connected through.
    pub link_id: Option<String>,
    /// The platform.
    pub provider: Platform,
    /// The provider's account id.
    pub provider_account_id: String,
    /// Handle, without `@`.
    pub username: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Avatar on the provider's CDN.
    pub avatar_url: Option<String>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// `active`, `broken` or `disconnected`.
    pub status: ConnectionStatus,
    /// Why it is broken or disconnected, in plain words.
    pub status_reason: Option<String>,
    /// When the current access token expires.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub access_token_expires_at: Option<OffsetDateTime>,
    /// When the refresh token expires (TikTok).
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub refresh_token_expires_at: Option<OffsetDateTime>,
    /// First connection.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub connected_at: OffsetDateTime,
    /// Last token refresh.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_refreshed_at: Option<OffsetDateTime>,
    /// How many times the client connected this account again.
    pub reconnect_count: i64,
    /// Made against the built-in sandbox, not the real provider.
    pub sandbox: bool,
    /// When the scheduler will refresh the tokens next.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_refresh_at: Option<OffsetDateTime>,
    /// Last health check.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_checked_at: Option<OffsetDateTime>,
    /// Consecutive failed refresh attempts (transient errors, still retried).
    pub refresh_failures: i64,
}

/// An event in a connection's history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectionEventView {
    /// What happened: `created`, `reconnected`, `refreshed`, `refresh_failed` (three failures in
    /// a row, still retried), `recovered` (refreshed after those), `refresh_interrupted` (an
    /// earlier attempt never finished), `scopes_changed`, `expiring` (the grant runs out within a
    /// week), `broken`, `disconnected`, `data_deleted` (the account holder asked the provider to
    /// delete their data).
    #[schema(example = "refreshed")]
    pub kind: String,
    /// Readable detail.
    pub detail: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
}

/// A connection with its history. (Its `Debug` hides the repair link, a capability URL.)
#[derive(Clone, Serialize, ToSchema)]
pub struct ConnectionDetail {
    /// The connection.
    #[serde(flatten)]
    pub connection: ConnectionView,
    /// The link to send to the client to repair the connection (the link it came through,
    /// while that link can repair it: neither revoked nor expired; a used-up link still repairs
    /// the accounts it connected).
    pub repair_url: Option<String>,
    /// Its history, oldest first.
    pub events: Vec<ConnectionEventView>,
}
redacted_debug!(ConnectionDetail, shown: [connection, events], hidden: [repair_url]);

/// A fresh access token.
#[derive(Clone, Serialize, ToSchema)]
pub struct AccessTokenView {
    /// The connection.
    pub connection_id: String,
    /// The platform.
    pub provider: Platform,
    /// The access token. Treat it as a secret.
    pub access_token: String,
    /// `Bearer`.
    pub token_type: &'static str,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    /// Made against the sandbox.
    pub sandbox: bool,
}
redacted_debug!(AccessTokenView, shown: [connection_id, provider, token_type, expires_at, sandbox], hidden: [access_token]);

/// Builds the view of a row.
pub fn view(row: &ConnectionRow) -> ConnectionView {
    ConnectionView {
        id: row.id.clone(),
        workspace_id: row.workspace_id.clone(),
        link_id: row.link_id.clone(),
        provider: row.provider.parse().unwrap_or(Platform::Tiktok),
        provider_account_id: row.provider_account_id.clone(),
        username: row.username.clone(),
        display_name: row.display_name.clone(),
        avatar_url: row.avatar_url.clone(),
        scopes: split_scopes(&row.scopes),
        status: ConnectionStatus::parse(&row.status),
        status_reason: row.status_reason.clone(),
        access_token_expires_at: row.access_expires_at.map(from_millis),
        refresh_token_expires_at: row.refresh_expires_at.map(from_millis),
        connected_at: from_millis(row.connected_at),
        last_refreshed_at: row.last_refreshed_at.map(from_millis),
        reconnect_count: row.reconnect_count,
        sandbox: row.sandbox != 0,
        next_refresh_at: row.next_refresh_at.map(from_millis),
        last_checked_at: row.last_checked_at.map(from_millis),
        refresh_failures: row.refresh_failures,
    }
}

/// Splits a comma-separated scope list.
pub fn split_scopes(s: &str) -> Vec<String> {
    s.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Where an access token is sealed.
pub(crate) fn access_aad<'a>(workspace: &'a str, id: &'a str) -> Aad<'a> {
    Aad::new(workspace, "connections", id, "access_token")
}

/// Where a refresh token is sealed.
pub(crate) fn refresh_aad<'a>(workspace: &'a str, id: &'a str) -> Aad<'a> {
    Aad::new(workspace, "connections", id, "refresh_token")
}

/// Writes `tokens` into `row` (sealed for the row), keeping the old refresh token when the
/// provider sent none.
pub(crate) fn apply_tokens(app: &App, row: &mut ConnectionRow, tokens: &TokenSet) {
    row.access_token_sealed =
        Some(app.keys.seal_str(tokens.access_token.expose_secret(), access_aad(&row.workspace_id, &row.id)));
    row.access_expires_at = Some(to_millis(tokens.access_expires_at));
    if let Some(rt) = &tokens.refresh_token {
        row.refresh_token_sealed =
            Some(app.keys.seal_str(rt.expose_secret(), refresh_aad(&row.workspace_id, &row.id)));
        row.refresh_expires_at = tokens.refresh_expires_at.map(to_millis);
    }
    row.token_generation += 1;
}

/// A history entry for `row`.
pub(crate) fn event(row: &ConnectionRow, kind: &str, detail: Option<String>, now_ms: i64) -> EventRow {
    EventRow {
        id: new_id(),
        connection_id: row.id.clone(),
        workspace_id: row.workspace_id.clone(),
        kind: kind.to_string(),
        detail,
        created_at: now_ms,
    }
}

/// Whether an upsert created a connection or repaired an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// A new connection.
    Created,
    /// The same account connected again.
    Reconnected,
}

/// What a successful connect flow brought back, to be stored.
#[derive(Debug)]
pub struct FlowResult {
    /// The flow.
    pub flow_id: String,
    /// The link it started from, as read at the callback.
    pub link: LinkRow,
    /// When the flow started (ms).
    pub started_at: i64,
    /// The SHA-256 of the link's token it was started with: a link rotated since takes no
    /// connection from it (see [`db::links::Start`]).
    pub link_token_hash: Option<String>,
    /// The provider.
    pub platform: Platform,
    /// The account.
    pub profile: Profile,
    /// Its tokens, with the scopes granted.
    pub tokens: TokenSet,
    /// Whether the provider is the built-in sandbox.
    pub sandbox: bool,
    /// The status reason of a connection granted fewer scopes than requested.
    pub scope_note: Option<String>,
}

/// Stores the result of a successful connect flow: inserts the connection or updates the
/// existing one, counts the link use, appends history and audit, records the flow's outcome, all
/// in one transaction (on a SQLite file, run synchronously: see [`db::lite`]). `None`, with
/// nothing written, when the link can no longer be used (revoked, expired or used up since the
/// callback read it).
pub async fn upsert_from_flow(
    app: &AppState,
    result: FlowResult,
) -> ServiceResult<Result<(ConnectionRow, Upserted), LinkStatus>> {
    let platform = result.platform;
    let work = StoreFlow { app: app.clone(), result };
    let (row, outcome) = match app.db.write_flow(work).await? {
        Ok(stored) => stored,
        Err(status) => {
            tracing::info!(
                provider = %platform,
                link_status = status.as_str(),
                "the link could not take this connection when it was to be stored"
            );
            return Ok(Err(status));
        }
    };
    let kind = match outcome {
        Upserted::Created => "created",
        Upserted::Reconnected => "reconnected",
    };
    tracing::info!(connection_id = %row.id, provider = %platform, outcome = kind, "connection stored");
    Ok(Ok((row, outcome)))
}

/// What a flow brought for one account, applied to its connection row.
struct Fresh<'a> {
    link: &'a LinkRow,
    profile: &'a Profile,
    tokens: &'a TokenSet,
    scopes: &'a str,
    sandbox: bool,
    scope_note: &'a Option<String>,
    now: i64,
}

impl Fresh<'_> {
    /// A new connection.
    fn new_row(&self, app: &App, platform: Platform) -> ConnectionRow {
        let (link, profile, now) = (self.link, self.profile, self.now);
        let mut row = ConnectionRow {
            id: new_id(),
            workspace_id: link.workspace_id.clone(),
            link_id: Some(link.id.clone()),
            provider: platform.as_str().into(),
            provider_account_id: profile.account_id.clone(),
            app_scoped_id: profile.app_scoped_id.clone(),
            username: profile.username.clone(),
            display_name: profile.display_name.clone(),
            avatar_url: profile.avatar_url.clone(),
            scopes: self.scopes.to_string(),
            access_token_sealed: None,
            access_expires_at: None,
            refresh_token_sealed: None,
            refresh_expires_at: None,
            token_generation: 0,
            status: ConnectionStatus::Active.as_str().into(),
            status_reason: self.scope_note.clone(),
            sandbox: i64::from(self.sandbox),
            connected_at: now,
            last_refreshed_at: Some(now),
            reconnect_count: 0,
            created_at: now,
            updated_at: now,
            next_refresh_at: None,
            lease_owner: None,
            lease_until: None,
            refresh_failures: 0,
            next_check_at: Some(super::refresh::schedule_check(app, now, true)),
            last_checked_at: None,
            expiring_notified_at: None,
        };
        apply_tokens(app, &mut row, self.tokens);
        row.next_refresh_at = super::refresh::schedule_refresh(now, row.access_expires_at);
        row
    }

    /// The existing connection `row` of the same account, repaired: new tokens, active, one more
    /// reconnect. Writes it.
    async fn reconnect<E: Exec>(
        &self,
        app: &App,
        tx: &mut E,
        mut row: ConnectionRow,
    ) -> ServiceResult<ConnectionRow> {
        let (link, profile, now) = (self.link, self.profile, self.now);
        // Of the indexed columns, only those that change are written (see `Indexed`).
        let indexed = db::connections::Indexed {
            link_id: row.link_id.as_deref() != Some(link.id.as_str()),
            username: row.username != profile.username,
            status: row.status != ConnectionStatus::Active.as_str(),
        };
        row.link_id = Some(link.id.clone());
        row.app_scoped_id = profile.app_scoped_id.clone().or(row.app_scoped_id);
        row.username = profile.username.clone();
        row.display_name = profile.display_name.clone();
        row.avatar_url = profile.avatar_url.clone();
        row.scopes = self.scopes.to_string();
        // A reconnect replaces the whole grant, including any old refresh token.
        row.refresh_token_sealed = None;
        row.refresh_expires_at = None;
        apply_tokens(app, &mut row, self.tokens);
        row.status = ConnectionStatus::Active.as_str().into();
        row.status_reason = self.scope_note.clone();
        row.sandbox = i64::from(self.sandbox);
        row.reconnect_count += 1;
        row.last_refreshed_at = Some(now);
        row.updated_at = now;
        row.refresh_failures = 0;
        row.expiring_notified_at = None;
        row.next_refresh_at = super::refresh::schedule_refresh(now, row.access_expires_at);
        row.next_check_at = Some(super::refresh::schedule_check(app, now, true));
        db::connections::update_changed(tx, &row, indexed).await?;
        Ok(row)
    }
}

/// The transaction of [`upsert_from_flow`].
struct StoreFlow {
    app: AppState,
    result: FlowResult,
}

impl db::FlowWrite for StoreFlow {
    /// The stored connection, or why the link could not take it (nothing is written then).
    type Output = Result<(ConnectionRow, Upserted), LinkStatus>;
    type Error = ServiceError;

    async fn run<E: Exec>(self, tx: &mut E) -> ServiceResult<Self::Output> {
        let Self {
            app,
            result:
                FlowResult {
                    flow_id,
                    link,
                    started_at,
                    link_token_hash,
                    platform,
                    profile,
                    tokens,
                    sandbox,
                    scope_note,
                },
        } = self;
        let start = db::links::Start { at_ms: started_at, token_hash: link_token_hash.as_deref() };
        let (app, flow_id, link, profile, tokens): (&App, &str, &LinkRow, &Profile, &TokenSet) =
            (&app, &flow_id, &link, &profile, &tokens);
        let now = app.now_ms();
        // The link is counted first, only if it can still be used: revoked, expired or used up
        // since the callback read it, nothing is written. A used-up link still repairs the
        // accounts it connected: `max_uses` limits the accounts, not their repairs. Not one the
        // agency removed (disconnected), which its page no longer offers: that would be a new
        // connection.
        let backend = app.db.backend();
        let counted = db::links::record_use(tx, &link.id, now, start).await?;
        let existing = db::connections::get_by_account_for_update(
            tx,
            backend,
            &link.workspace_id,
            platform.as_str(),
            &profile.account_id,
        )
        .await?;
        let used = match counted {
            Some(used) => used,
            None => {
                let current = db::links::get(tx, &link.id).await?;
                let status = current.as_ref().map_or(LinkStatus::Revoked, |l| LinkStatus::of(l, now));
                let its_own = existing.as_ref().is_some_and(|c| {
                    c.link_id.as_deref() == Some(link.id.as_str())
                        && ConnectionStatus::parse(&c.status) != ConnectionStatus::Disconnected
                });
                if status != LinkStatus::UsedUp || !its_own {
                    return Ok(Err(status));
                }
                match db::links::record_repair(tx, &link.id, now, start).await? {
                    Some(used) => used,
                    None => return Ok(Err(LinkStatus::Revoked)),
                }
            }
        };
        let scopes = tokens.scopes.join(",");
        let fresh = Fresh { link, profile, tokens, scopes: &scopes, sandbox, scope_note: &scope_note, now };
        let (row, outcome) = match existing {
            Some(row) => (fresh.reconnect(app, tx, row).await?, Upserted::Reconnected),
            None => {
                let row = fresh.new_row(app, platform);
                if db::connections::insert_if_absent(tx, &row).await? {
                    (row, Upserted::Created)
                } else {
                    // Stored by a concurrent first connection of the same account since the
                    // read (PostgreSQL): this one reconnects it, after that one's transaction.
                    let row = db::connections::get_by_account_for_update(
                        tx,
                        backend,
                        &link.workspace_id,
                        platform.as_str(),
                        &profile.account_id,
                    )
                    .await?
                    .ok_or(ServiceError::Conflict("the connection changed meanwhile; try again".into()))?;
                    (fresh.reconnect(app, tx, row).await?, Upserted::Reconnected)
                }
            }
        };
        let (kind, action) = match outcome {
            Upserted::Created => ("created", "connection.created"),
            Upserted::Reconnected => ("reconnected", "connection.reconnected"),
        };
        let handle = row.username.as_deref().or(row.display_name.as_deref()).unwrap_or("account").to_string();
        db::connections::insert_event(
            tx,
            &event(
                &row,
                kind,
                Some(format!("{} {handle} via link “{}” ({})", platform.display_name(), link.label, link.id)),
                now,
            ),
        )
        .await?;
        audit::record(
            tx,
            now,
            &Actor::Client,
            Some(&row.workspace_id),
            action,
            "connection",
            &row.id,
            serde_json::json!({"provider": platform, "link_id": link.id, "sandbox": sandbox}),
        )
        .await?;
        // The event's data (which unseals the link's token) is built only when an endpoint wants it.
        let endpoints = super::webhooks::endpoints_for(tx, &row.workspace_id, action, None).await?;
        if !endpoints.is_empty() {
            let data = event_data_with_link(app, &row, &used, None)?;
            super::webhooks::enqueue(tx, &app.keys, now, &row.workspace_id, action, data, endpoints).await?;
        }
        let flow_outcome = match outcome {
            Upserted::Created => "connected",
            Upserted::Reconnected => "reconnected",
        };
        db::oauth_flows::finish(tx, flow_id, flow_outcome, Some(&row.id), None).await?;
        Ok(Ok((row, outcome)))
    }
}

/// Loads a connection the caller may see.
pub async fn get_row(app: &App, scope: &Scope, id: &str) -> ServiceResult<ConnectionRow> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("connection"));
    }
    let mut conn = app.db.read().await?;
    match db::connections::get(&mut conn, id).await? {
        Some(c) if scope.allows(&c.workspace_id) => Ok(c),
        _ => Err(ServiceError::NotFound("connection")),
    }
}

/// One connection with its history.
pub async fn get(app: &App, scope: &Scope, id: &str) -> ServiceResult<ConnectionDetail> {
    let row = get_row(app, scope, id).await?;
    let mut conn = app.db.read().await?;
    let events = db::connections::events(&mut conn, &row.id)
        .await?
        .into_iter()
        .map(|e| ConnectionEventView { kind: e.kind, detail: e.detail, at: from_millis(e.created_at) })
        .collect();
    let repair_url = repair_url(&mut conn, app, &row).await?;
    Ok(ConnectionDetail { connection: view(&row), repair_url, events })
}

/// Filters of [`list`].
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    /// Only this workspace.
    pub workspace_id: Option<String>,
    /// Only this status.
    pub status: Option<ConnectionStatus>,
    /// Only this platform.
    pub provider: Option<Platform>,
    /// Only connections made through this link.
    pub link_id: Option<String>,
    /// The cursor.
    pub before: Option<String>,
    /// Page size.
    pub limit: i64,
}

/// Connections visible to the caller, newest first.
pub async fn list(app: &App, scope: &Scope, q: &ListQuery) -> ServiceResult<Vec<ConnectionView>> {
    let mut conn = app.db.read().await?;
    let workspace = scope.listing_workspace(&mut conn, q.workspace_id.as_deref()).await?;
    let rows = db::connections::list(
        &mut conn,
        &ConnectionFilter {
            workspace_id: workspace.as_deref(),
            status: q.status.map(ConnectionStatus::as_str),
            provider: q.provider.map(Platform::as_str),
            link_id: q.link_id.as_deref(),
            before: q.before.as_deref(),
        },
        q.limit,
    )
    .await?;
    Ok(rows.iter().map(view).collect())
}

/// Connections made through one link (for the client's view of the link).
pub async fn of_link(app: &App, link_id: &str) -> ServiceResult<Vec<ConnectionRow>> {
    let mut conn = app.db.read_fast().await?;
    Ok(db::connections::list(
        &mut conn,
        &ConnectionFilter { link_id: Some(link_id), ..Default::default() },
        50,
    )
    .await?)
}

/// One connection `scope` may see, which must be active: a refresh or health check asked for
/// by hand of a broken or disconnected one is refused (409) with its status and reason, as a
/// token read is, instead of answering that there was nothing to do.
pub async fn get_active_row(app: &App, scope: &Scope, id: &str) -> ServiceResult<ConnectionRow> {
    let row = get_row(app, scope, id).await?;
    refuse_inactive(&row)?;
    Ok(row)
}

/// Refuses (409, with its status and reason) a connection that is not active.
fn refuse_inactive(row: &ConnectionRow) -> ServiceResult<()> {
    let status = ConnectionStatus::parse(&row.status);
    if status != ConnectionStatus::Active {
        return Err(ServiceError::Conflict(format!(
            "the connection is {}: {}",
            status.as_str(),
            row.status_reason.as_deref().unwrap_or("the client must reconnect through a link")
        )));
    }
    Ok(())
}

/// Disconnects: revokes the grant at the provider where the provider offers revocation, then
/// marks the connection disconnected and erases its tokens. The provider revokes with the access
/// token: one about to run out is refreshed first, and one the provider refuses is refreshed
/// once and offered again (a refused access token is not a dead grant, providers.md §9.3). A
/// provider that cannot revoke the grant for now leaves the connection connected (503; see
/// `revoke_at_provider`), and so does a reconnect by the client after the disconnect was asked
/// for (409).
pub async fn disconnect(app: &App, actor: &Actor, scope: &Scope, id: &str) -> ServiceResult<ConnectionView> {
    // The caller's right to the connection first: the in-process lock is taken only for a
    // connection that exists and is the caller's, so that ids sent by anyone neither fill the
    // lock table nor wait (and so tell) while another workspace's connection is busy.
    let row = get_row(app, scope, id).await?;
    let id = row.id.clone();
    // The client's reconnects from here on are theirs to keep (see `disconnect_leased`).
    let reconnects = row.reconnect_count;
    let deadline = tokio::time::Instant::now() + within_request(app);
    let revokes = row
        .provider
        .parse::<Platform>()
        .ok()
        .and_then(|p| app.providers.serving(p, row.sandbox != 0).ok())
        .is_some_and(|p| p.offers_revocation());
    let expiring = row.access_expires_at.is_some_and(|at| at - app.now_ms() < STILL_VALID_MS);
    let mut refreshed = false;
    if revokes && expiring && ConnectionStatus::parse(&row.status) == ConnectionStatus::Active {
        refresh_before_revoking(app, &id, deadline, false).await?;
        refreshed = true;
    }
    loop {
        match disconnect_locked(app, actor, scope, &id, deadline, reconnects, refreshed).await? {
            Disconnect::Done(view) => return Ok(*view),
            // Returned only before a refresh here: the loop runs twice at most.
            Disconnect::TokenRefused => {
                refresh_before_revoking(app, &id, deadline, true).await?;
                refreshed = true;
            }
        }
    }
}

/// How far a disconnect went.
enum Disconnect {
    /// Disconnected (now, or before).
    Done(Box<ConnectionView>),
    /// The provider refused the access token before any refresh in this disconnect: to be
    /// refreshed, and offered again.
    TokenRefused,
}

/// Refreshes a connection's access token before its grant is revoked with it (forced: the
/// provider refused the token). A refresh that fails for now leaves the connection connected
/// (503); one that finds the grant dead does not stop the disconnect (the connection is broken
/// first, as by any refresh, and the revocation has nothing left to end).
async fn refresh_before_revoking(
    app: &App,
    id: &str,
    deadline: tokio::time::Instant,
    force: bool,
) -> ServiceResult<()> {
    let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
    match super::refresh::refresh(app, id, force, STILL_VALID_MS, Some(wait)).await? {
        super::refresh::Outcome::Transient(reason) => Err(ServiceError::Unavailable(format!(
            "the access token could not be refreshed before the grant is revoked with it ({reason}); the \
             connection was not disconnected: disconnect it again in a moment"
        ))),
        _ => Ok(()),
    }
}

/// One try of [`disconnect`]: no refresh anywhere while the grant is revoked (it would rotate
/// the tokens being revoked, or meet the revoked grant and report the connection broken): this
/// process's lock, then the refresh lease, both waited for until `deadline`. A refresh here that
/// outlasts it answers 503 (try again); a lease held elsewhere past it (a process that died
/// holding it, or a slow one) does not stop the disconnect, whose write looks at what changed
/// meanwhile.
async fn disconnect_locked(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    id: &str,
    deadline: tokio::time::Instant,
    reconnects: i64,
    refreshed: bool,
) -> ServiceResult<Disconnect> {
    let lock = super::refresh::connection_lock(id);
    let Ok(_guard) = tokio::time::timeout_at(deadline, lock.lock()).await else {
        return Err(ServiceError::Unavailable(
            "a refresh of this connection is under way; disconnect it again in a moment".into(),
        ));
    };
    let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
    let leased = super::refresh::take_lease_waiting(app, id, wait).await?;
    if !leased {
        tracing::debug!(connection_id = %id, "disconnecting without the refresh lease");
    }
    let result = disconnect_leased(app, actor, scope, id, reconnects, refreshed).await;
    // Given back whatever happened (after the disconnect's own write, which gave it back, this
    // finds nothing to give): a connection found disconnected meanwhile may be reconnected
    // before a lease left on it would run out.
    if leased {
        let owner = super::refresh::owner_id();
        let released =
            async { db::connections::release_lease(&mut *app.db.writer().await?, id, owner).await }.await;
        if let Err(e) = released {
            tracing::warn!(connection_id = %id, error = %e, "a disconnect's lease could not be given back");
        }
    }
    result
}

/// [`disconnect`] once the refresh lease is held (or could not be had).
async fn disconnect_leased(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    id: &str,
    reconnects: i64,
    refreshed: bool,
) -> ServiceResult<Disconnect> {
    // Read under the lease: a refresh that finished elsewhere meanwhile stored the token to revoke.
    let mut row = get_row(app, scope, id).await?;
    let status = ConnectionStatus::parse(&row.status);
    if status == ConnectionStatus::Disconnected {
        return Ok(Disconnect::Done(Box::new(view(&row))));
    }
    if row.reconnect_count != reconnects {
        return Err(reconnected_meanwhile(false));
    }
    // Twice at most: a refused token is refreshed once.
    let mut refreshed = refreshed;
    let revoked_note = loop {
        match revoke_at_provider(app, &row, refreshed).await? {
            Revocation::Said(note) => break note,
            // Refreshed by the refresh service, outside this process's lock.
            Revocation::TokenRefused if status == ConnectionStatus::Active => {
                return Ok(Disconnect::TokenRefused);
            }
            // Broken: the refresh service leaves it alone; refreshed here.
            Revocation::TokenRefused => {
                refreshed = true;
                match refresh_broken_to_revoke(app, &row).await? {
                    Ok(fresh) => row = fresh,
                    Err(note) => break note,
                }
            }
        }
    };
    // Recorded through a database outage: a connection whose grant was revoked would otherwise
    // stay active with dead tokens, to be announced broken at its next refresh.
    super::refresh::through_outage(app, &row.id, "a disconnect", || {
        record_disconnect(app, actor, &row, reconnects, &revoked_note)
    })
    .await
}

/// Writes the end of [`disconnect_leased`], the provider asked: the connection disconnected and
/// its tokens erased, unless the client reconnected meanwhile or (the grant not revoked) new
/// tokens were stored meanwhile.
async fn record_disconnect(
    app: &App,
    actor: &Actor,
    row: &ConnectionRow,
    reconnects: i64,
    revoked_note: &str,
) -> ServiceResult<Disconnect> {
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    // The row as it stands now (locked): a refresh or reconnect by another process while the
    // provider was asked must not come back from the copy read before.
    let current = db::connections::get_for_update(&mut tx, app.db.backend(), &row.id)
        .await?
        .ok_or(ServiceError::NotFound("connection"))?;
    if ConnectionStatus::parse(&current.status) == ConnectionStatus::Disconnected {
        return Ok(Disconnect::Done(Box::new(view(&current))));
    }
    let revoked = revoked_note == REVOKED;
    // The client reconnected while the provider was asked, and saw it succeed: that connection is
    // kept, not undone unseen.
    if current.reconnect_count != reconnects {
        if revoked {
            // The provider ended the grant the connection held; a grant made just before may
            // have gone with it (TikTok removes the app from the account): checked at once.
            db::connections::set_next_check(&mut tx, &current.id, now).await?;
            audit::record(
                &mut tx,
                now,
                actor,
                Some(&current.workspace_id),
                "connection.disconnect_overtaken",
                "connection",
                &current.id,
                serde_json::json!({"provider_revocation": revoked_note}),
            )
            .await?;
            tx.commit().await?;
        }
        return Err(reconnected_meanwhile(revoked));
    }
    // Tokens a refresh elsewhere stored meanwhile: of the grant just revoked, which takes them
    // with it; but a grant the old token did not revoke may live on with them.
    if current.token_generation != row.token_generation && !revoked {
        return Err(ServiceError::Conflict(
            "new tokens were stored while the grant was being revoked with the ones before; the connection \
             was not disconnected: disconnect it again"
                .into(),
        ));
    }
    let mut row = current;
    row.status = ConnectionStatus::Disconnected.as_str().into();
    row.status_reason = Some(format!("Disconnected by the agency ({revoked_note})."));
    row.access_token_sealed = None;
    row.refresh_token_sealed = None;
    row.access_expires_at = None;
    row.refresh_expires_at = None;
    row.token_generation += 1;
    row.next_refresh_at = None;
    row.next_check_at = None;
    row.updated_at = now;
    db::connections::update(&mut tx, &row).await?;
    db::connections::release_lease(&mut tx, &row.id, super::refresh::owner_id()).await?;
    db::connections::insert_event(&mut tx, &event(&row, "disconnected", Some(revoked_note.to_owned()), now))
        .await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.workspace_id),
        "connection.disconnected",
        "connection",
        &row.id,
        serde_json::json!({"provider_revocation": revoked_note}),
    )
    .await?;
    let data = event_data(&mut tx, app, &row, row.status_reason.as_deref()).await?;
    super::webhooks::emit(&mut tx, app, now, &row.workspace_id, "connection.disconnected", data).await?;
    tx.commit().await?;
    Ok(Disconnect::Done(Box::new(view(&row))))
}

/// The answer to a disconnect overtaken by the client's reconnect (409).
fn reconnected_meanwhile(revoked: bool) -> ServiceError {
    ServiceError::Conflict(format!(
        "the client reconnected this account after the disconnect was asked for, so the connection was kept{}; \
         disconnect it again if it should go",
        if revoked {
            " (the earlier grant was revoked at the provider; the connection's health check is due now)"
        } else {
            ""
        }
    ))
}

/// What a disconnect's status reason and audit entry say of a grant revoked at the provider.
const REVOKED: &str = "revoked at the provider";

/// What became of a revocation.
enum Revocation {
    /// Done, or not to be done: what the status reason and the audit entry say of it.
    Said(String),
    /// The provider refused the access token, not yet refreshed in this disconnect.
    TokenRefused,
}

/// Revokes a connection's grant at its provider before a disconnect, and says how it went, for
/// the connection's status reason and the audit log. A provider that cannot revoke it for now
/// (unreachable, 429, 5xx) or that refuses authlink's own settings, a token sealed with a key
/// this process does not hold, or a real connection where this instance simulates its provider,
/// stops the disconnect, the connection left connected: the tokens a disconnect erases are the
/// only way to revoke the grant later. A refused access token is to be refreshed and offered
/// again, once (`refreshed` says it was): an active connection's by the refresh service, a broken
/// one's by the disconnect ([`refresh_broken_to_revoke`]). A grant that cannot be revoked
/// with what is stored (a dead grant, a token or request the provider refuses after a refresh,
/// tokens that fail to open with the key they name, a provider not enabled here) does not stop
/// it: the agency's removal of the connection goes ahead, and the reason says the grant may
/// still be listed in the account's settings. A sandbox connection where the real provider runs
/// has no grant there to revoke.
async fn revoke_at_provider(app: &App, row: &ConnectionRow, refreshed: bool) -> ServiceResult<Revocation> {
    let platform: Platform = row.provider.parse().map_err(|_| ServiceError::NotFound("connection"))?;
    let name = platform.display_name();
    let said = |note: String| Ok(Revocation::Said(note));
    let Some(sealed) = row.access_token_sealed.as_deref() else {
        return said("not revoked at the provider: the connection holds no token".into());
    };
    let provider = match app.providers.serving(platform, row.sandbox != 0) {
        Ok(provider) => provider,
        Err(Mode::Off) => {
            return said(format!("not revoked: {name} is not enabled on this instance; {STILL_LISTED}"));
        }
        // A sandbox grant is no grant at the real provider.
        Err(Mode::Real) => {
            return said(format!("not revoked: the connection was made with the {name} sandbox"));
        }
        // The real grant lives on, and only its tokens can end it.
        Err(mode @ Mode::Simulated) => {
            return Err(ServiceError::Unavailable(format!(
                "the grant cannot be revoked by this instance, so the connection was not disconnected: {}; \
                 disconnect it through an instance with the {name} credentials",
                mode.explain(platform)
            )));
        }
    };
    if !provider.offers_revocation() {
        return said(format!("{name} offers no revocation"));
    }
    let token = match app.keys.open_str(sealed, access_aad(&row.workspace_id, &row.id)) {
        Ok(token) => token,
        Err(e @ crate::crypto::CryptoError::UnknownKey(_)) => {
            tracing::error!(connection_id = %row.id, error = %e, "the stored tokens need a key this process does not hold");
            return Err(ServiceError::Unavailable(format!(
                "the grant cannot be revoked at {name} by this process, so the connection was not disconnected: \
                 the stored tokens are {e}; disconnect it through a process started with that master key"
            )));
        }
        Err(e) => {
            tracing::error!(connection_id = %row.id, error = %e, "the stored tokens cannot be opened");
            return said(format!("not revoked: the stored tokens cannot be opened; {STILL_LISTED}"));
        }
    };
    let refusal = match provider.revoke(&token).await {
        Ok(true) => return said(REVOKED.into()),
        Ok(false) => return said(format!("{name} offers no revocation")),
        Err(e) => {
            tracing::warn!(connection_id = %row.id, error = %e, "revocation at the provider failed");
            e
        }
    };
    let refused_token = !matches!(
        refusal,
        ProviderError::Transient { .. }
            | ProviderError::Misconfigured { .. }
            | ProviderError::Permanent { .. }
    );
    if refused_token && !refreshed && row.refresh_token_sealed.is_some() {
        return Ok(Revocation::TokenRefused);
    }
    Ok(Revocation::Said(judge_failure(
        name,
        "revoke the grant",
        &format!("revocation refused by {name}"),
        refusal,
    )?))
}

/// What a disconnect's status reason says of a grant it could not revoke.
const STILL_LISTED: &str = "the grant may still be listed in the account's settings";

/// What a provider's failure when asked to `doing` means for a disconnect: one for now, or a
/// refusal of authlink's own settings, stops it (503, the connection left connected); a dead
/// grant, or another refusal (`refused` says whose), lets it go on, with what its status reason
/// says.
fn judge_failure(name: &str, doing: &str, refused: &str, failure: ProviderError) -> ServiceResult<String> {
    match failure {
        ProviderError::Transient { reason, .. } => Err(ServiceError::Unavailable(format!(
            "{name} could not {doing} right now ({reason}); the connection was not disconnected: disconnect it \
             again in a moment"
        ))),
        ProviderError::Misconfigured { reason } => Err(ServiceError::Unavailable(format!(
            "{name} refused authlink's own settings when asked to {doing} ({reason}); the connection was not \
             disconnected: the operator must correct the {name} settings, then disconnect it again"
        ))),
        // A dead grant has nothing left to revoke.
        ProviderError::Permanent { reason } => {
            Ok(format!("not revoked: the grant is no longer valid at {name} ({reason}); {STILL_LISTED}"))
        }
        other => Ok(format!("{refused} ({}); {STILL_LISTED}", other.reason())),
    }
}

/// Refreshes a broken connection's tokens for its grant to be revoked with (a connection broken
/// for a withdrawn scope keeps a live grant, whose access token runs out within a day), since
/// the refresh service refreshes active connections only. The new tokens are stored, the
/// connection left broken, so that a revocation that then fails for now leaves the grant
/// revocable later (TikTok's refresh token rotates: the one sent dies). `Err(note)`: nothing
/// left to revoke with, as the status reason says it. Runs under the disconnect's lock.
async fn refresh_broken_to_revoke(
    app: &App,
    row: &ConnectionRow,
) -> ServiceResult<Result<ConnectionRow, String>> {
    let platform: Platform = row.provider.parse().map_err(|_| ServiceError::NotFound("connection"))?;
    let name = platform.display_name();
    let provider = app
        .providers
        .serving(platform, row.sandbox != 0)
        .map_err(|m| ServiceError::Conflict(m.explain(platform)))?;
    let (Some(access), Some(refresh)) =
        (row.access_token_sealed.as_deref(), row.refresh_token_sealed.as_deref())
    else {
        return Ok(Err(format!("not revoked: the connection holds no token to refresh; {STILL_LISTED}")));
    };
    let access = app.keys.open_str(access, access_aad(&row.workspace_id, &row.id))?;
    let refresh = app.keys.open_str(refresh, refresh_aad(&row.workspace_id, &row.id))?;
    let tokens = match provider.refresh(&access, Some(&refresh), app.now()).await {
        Ok(tokens) => tokens,
        Err(e) => {
            tracing::warn!(connection_id = %row.id, error = %e, "refresh before revoking a broken connection's grant failed");
            let refused = format!("revocation refused by {name}, and the token could not be refreshed");
            return Ok(Err(judge_failure(name, "refresh the token the grant is revoked with", &refused, e)?));
        }
    };
    // Stored through a database outage: TikTok's refresh token rotated, the one stored is dead.
    let stored = super::refresh::through_outage(app, &row.id, "tokens refreshed to revoke a grant", || {
        store_broken_refresh(app, row, &tokens)
    })
    .await?;
    Ok(Ok(stored))
}

/// Stores the tokens [`refresh_broken_to_revoke`] obtained on the broken connection `row`, unless
/// it changed meanwhile.
async fn store_broken_refresh(
    app: &App,
    row: &ConnectionRow,
    tokens: &TokenSet,
) -> ServiceResult<ConnectionRow> {
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let mut current = db::connections::get_for_update(&mut tx, app.db.backend(), &row.id)
        .await?
        .ok_or(ServiceError::NotFound("connection"))?;
    if current.token_generation != row.token_generation
        || ConnectionStatus::parse(&current.status) != ConnectionStatus::Broken
    {
        // Reconnected (or disconnected) meanwhile: what was stored then stands.
        return Err(ServiceError::Conflict(
            "the connection changed while its token was refreshed to revoke the grant; the connection was not \
             disconnected: disconnect it again"
                .into(),
        ));
    }
    apply_tokens(app, &mut current, tokens);
    current.last_refreshed_at = Some(now);
    current.updated_at = now;
    db::connections::update(&mut tx, &current).await?;
    db::connections::insert_event(
        &mut tx,
        &event(&current, "refreshed", Some("to revoke the grant before a disconnect".into()), now),
    )
    .await?;
    tx.commit().await?;
    Ok(current)
}

/// Tokens are refreshed first when they would expire within this many seconds.
pub const REFRESH_MARGIN_SECS: i64 = 300;

/// How long a token must still be valid to be handed out when its refresh failed for now.
const STILL_VALID_MS: i64 = 60_000;

/// How long a request's work waits for a refresh in flight (in this process or another): a read
/// of an access token before it answers with the current token, a disconnect before it revokes
/// without the lease. Within the request's time, leaving room for a provider call of its own and
/// for the answer.
fn within_request(app: &App) -> std::time::Duration {
    let request = app.config.http.request_timeout_secs;
    let provider = app.config.providers.timeout_secs;
    std::time::Duration::from_secs(request.saturating_sub(provider).saturating_sub(5).max(1))
}

/// Returns a valid access token, refreshing first when it would expire within five minutes
/// (through the single-flight refresh path). When that refresh fails for now (the provider is
/// down or slow, or a refresh in flight elsewhere outlasts what the request's time allows) and
/// the token is still valid for at least a minute, it is returned as it is; else the caller gets
/// 503. Every read is audit-logged.
pub async fn access_token(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    id: &str,
) -> ServiceResult<AccessTokenView> {
    let row = get_row(app, scope, id).await?;
    let outcome =
        super::refresh::refresh(app, &row.id, false, REFRESH_MARGIN_SECS * 1000, Some(within_request(app)))
            .await?;
    let (row, refreshed) = match outcome {
        super::refresh::Outcome::Refreshed(row) => (*row, true),
        super::refresh::Outcome::Current(row) => (*row, false),
        super::refresh::Outcome::Transient(reason) => {
            // The refresh ahead of expiry failed for now; a token that is still valid for a
            // while is still worth more to the caller than an error (the scheduler retries).
            // Broken or disconnected meanwhile: 409, as for a connection found so at once.
            let current = get_row(app, scope, id).await?;
            refuse_inactive(&current)?;
            let valid_for_ms = current.access_expires_at.map_or(0, |at| at - app.now_ms());
            if valid_for_ms < STILL_VALID_MS {
                return Err(ServiceError::Unavailable(format!(
                    "the token could not be refreshed right now: {reason}"
                )));
            }
            tracing::warn!(connection_id = %current.id, %reason, "refresh failed; the current token is still valid");
            (current, false)
        }
        super::refresh::Outcome::Broken(reason) => {
            return Err(ServiceError::Conflict(format!("the connection is broken: {reason}")));
        }
    };
    refuse_inactive(&row)?;
    let platform: Platform = row.provider.parse().map_err(|_| ServiceError::NotFound("connection"))?;
    let sealed = row
        .access_token_sealed
        .as_deref()
        .ok_or(ServiceError::Conflict("the connection holds no token".into()))?;
    let token = app.keys.open_str(sealed, access_aad(&row.workspace_id, &row.id))?;
    let now_ms = app.now_ms();
    let mut conn = app.db.writer().await?;
    audit::record(
        &mut conn,
        now_ms,
        actor,
        Some(&row.workspace_id),
        "connection.token_read",
        "connection",
        &row.id,
        serde_json::json!({"refreshed": refreshed}),
    )
    .await?;
    Ok(AccessTokenView {
        connection_id: row.id.clone(),
        provider: platform,
        access_token: token.expose_secret().to_string(),
        token_type: "Bearer",
        expires_at: row.access_expires_at.map(from_millis),
        sandbox: row.sandbox != 0,
    })
}

/// Marks a connection broken with a readable reason, on `tx`: history, audit and exactly one
/// `connection.broken` event (nothing when it already is broken).
pub async fn mark_broken_in(
    tx: &mut sqlx::AnyConnection,
    app: &App,
    row: &mut ConnectionRow,
    reason: &str,
    now: i64,
) -> ServiceResult<()> {
    mark_broken(tx, app, row, reason, now, false).await.map(drop)
}

/// [`mark_broken_in`] for a row read before the transaction (a refresh or health check that
/// waited for the provider): only if the stored row is still as read, with the same tokens and
/// status. A connection refreshed, reconnected or disconnected meanwhile is left as it is, and
/// `false` comes back.
pub async fn mark_broken_if_unchanged(
    tx: &mut sqlx::AnyConnection,
    app: &App,
    row: &mut ConnectionRow,
    reason: &str,
    now: i64,
) -> ServiceResult<bool> {
    mark_broken(tx, app, row, reason, now, true).await
}

async fn mark_broken(
    tx: &mut sqlx::AnyConnection,
    app: &App,
    row: &mut ConnectionRow,
    reason: &str,
    now: i64,
    guarded: bool,
) -> ServiceResult<bool> {
    let was = ConnectionStatus::parse(&row.status);
    let (read_generation, read_status) = (row.token_generation, row.status.clone());
    row.status = ConnectionStatus::Broken.as_str().into();
    row.status_reason = Some(reason.to_string());
    row.next_refresh_at = None;
    row.next_check_at = None;
    row.updated_at = now;
    if guarded {
        // Only the columns breaking changes: the copy read before the provider was asked may be
        // stale in others (an expiry announcement, a health check's profile) that stay as stored.
        let written =
            db::connections::set_broken_if_unchanged(tx, &row.id, reason, now, read_generation, &read_status)
                .await?;
        if !written {
            tracing::info!(connection_id = %row.id, "connection changed meanwhile; not marked broken");
            return Ok(false);
        }
    } else {
        db::connections::update(tx, row).await?;
    }
    if was != ConnectionStatus::Broken {
        db::connections::insert_event(tx, &event(row, "broken", Some(reason.to_string()), now)).await?;
        audit::record(
            tx,
            now,
            &Actor::System,
            Some(&row.workspace_id),
            "connection.broken",
            "connection",
            &row.id,
            serde_json::json!({"reason": reason}),
        )
        .await?;
        let data = event_data(tx, app, row, Some(reason)).await?;
        super::webhooks::emit(tx, app, now, &row.workspace_id, "connection.broken", data).await?;
        tracing::warn!(connection_id = %row.id, "connection marked broken");
    }
    Ok(true)
}

/// The `data` of a connection webhook: the connection (never tokens), a detail, and the link
/// that repairs it.
pub async fn event_data(
    conn: &mut impl Exec,
    app: &App,
    row: &ConnectionRow,
    detail: Option<&str>,
) -> ServiceResult<serde_json::Value> {
    let repair = repair_url(conn, app, row).await?;
    Ok(event_payload(row, repair, detail))
}

/// [`event_data`] for a connection whose link is at hand (as it stands after this change).
pub fn event_data_with_link(
    app: &App,
    row: &ConnectionRow,
    link: &LinkRow,
    detail: Option<&str>,
) -> ServiceResult<serde_json::Value> {
    Ok(event_payload(row, repair_url_of(app, link)?, detail))
}

fn event_payload(row: &ConnectionRow, repair: Option<String>, detail: Option<&str>) -> serde_json::Value {
    let mut data = serde_json::to_value(view(row)).unwrap_or(serde_json::Value::Null);
    if let Some(obj) = data.as_object_mut() {
        obj.insert("detail".into(), detail.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null));
        obj.insert(
            "repair_url".into(),
            repair.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null),
        );
    }
    data
}

/// The link that repairs a connection: the URL of the link it last came through, if that link
/// can still repair it (active, or used up: a used-up link still repairs the accounts it
/// connected).
pub async fn repair_url(
    conn: &mut impl Exec,
    app: &App,
    row: &ConnectionRow,
) -> ServiceResult<Option<String>> {
    let Some(link_id) = row.link_id.as_deref() else { return Ok(None) };
    let Some(link) = db::links::get(conn, link_id).await? else { return Ok(None) };
    repair_url_of(app, &link)
}

/// The URL of `link`, if it can still repair the connections it made (not revoked, not
/// expired).
fn repair_url_of(app: &App, link: &LinkRow) -> ServiceResult<Option<String>> {
    if !super::links::LinkStatus::of(link, app.now_ms()).repairs() {
        return Ok(None);
    }
    let token =
        app.keys.open_str(&link.token_sealed, super::links::token_aad(&link.workspace_id, &link.id))?;
    Ok(Some(super::links::url_for(app, token.expose_secret())))
}

#[cfg(test)]
mod lock_tests {
    use crate::service::{Actor, Scope, ServiceError};

    /// A disconnect of an id that is not the caller's (unknown, malformed or another workspace's)
    /// is refused before the in-process lock is taken: the lock table does not grow with ids
    /// anyone sends, and a busy connection of another workspace makes nobody else wait.
    #[tokio::test]
    async fn disconnect_checks_the_caller_before_it_locks() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::startup::state_for_tests(dir.path()).await;
        let scope = Scope::Workspace(crate::db::new_id());
        for id in [crate::db::new_id(), format!("{}-{}", crate::db::new_id(), "x".repeat(60_000))] {
            let got = super::disconnect(&app, &Actor::Cli, &scope, &id).await;
            assert!(matches!(got, Err(ServiceError::NotFound("connection"))), "{got:?}");
            assert!(
                !super::super::refresh::has_lock_entry(&id),
                "no lock made for an id that is not the caller's"
            );
        }
    }
}
