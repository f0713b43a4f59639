//! Token refresh and health checks: one refresh of a connection at a time, everywhere.
//!
//! The rules, in order of defence:
//! 1. Within a process, one async lock per connection serialises every refresher (scheduler,
//!    API, CLI path in the same process).
//! 2. Across processes and instances, a lease in the database (`lease_owner` and `lease_until`
//!    of `refresh_schedule`, next to the due time): the scheduler claims batches with
//!    `FOR UPDATE SKIP LOCKED` on PostgreSQL and inside `BEGIN IMMEDIATE` on SQLite; an on-demand
//!    refresh claims one row. A caller that finds the lease taken waits for the holder's result
//!    instead of starting another refresh. A lease runs out after `jobs.lease_secs`, so a crashed
//!    process's claims come back; the provider timeout is far shorter than the lease, so a live
//!    holder never loses its lease mid-call.
//! 3. No database transaction is held across the provider call. Before the call a
//!    `refresh_attempts` row is committed; after it, the new tokens (including a rotated
//!    refresh token), the next refresh time and the attempt's outcome are written in one
//!    transaction (on PostgreSQL, for the scheduler's refreshes, one statement), by
//!    compare-and-set on the token generation. A crash in between leaves the attempt `started`;
//!    the next refresher marks it `interrupted`, and if the provider then refuses the old
//!    refresh token, the connection is marked broken with that explanation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::Rng;
use secrecy::SecretString;

use super::connections::{self, ConnectionStatus, access_aad, refresh_aad};
use super::{Actor, ServiceError, ServiceResult, audit, webhooks};
use crate::clock::to_millis;
use crate::db::connections::{AttemptRow, ConnectionRow};
use crate::db::{self, new_id};
use crate::domain::Platform;
use crate::providers::{Provider, ProviderError};
use crate::state::App;

/// After this many consecutive transient failures, `connection.refresh_failed` is sent.
pub const REFRESH_FAILED_THRESHOLD: i64 = 3;

/// This process's lease owner id: host, pid and a random part.
pub fn owner_id() -> &'static str {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER.get_or_init(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        format!("{host}:{}:{}", std::process::id(), hex::encode(crate::crypto::random_bytes::<4>()))
    })
}

/// The in-process lock of one connection.
pub fn connection_lock(id: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let map = LOCKS.get_or_init(Default::default);
    let mut guard = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if guard.len() > 4096 {
        guard.retain(|_, l| Arc::strong_count(l) > 1);
    }
    guard.entry(id.to_string()).or_default().clone()
}

/// When to refresh next: at 75-80 % of the access token's remaining lifetime, with jitter so
/// that connections made together do not refresh together. Lifetimes come from the provider's
/// answers (`expires_in`), never from constants.
pub fn schedule_refresh(now_ms: i64, access_expires_at: Option<i64>) -> Option<i64> {
    let expires = access_expires_at?;
    let lifetime = (expires - now_ms).max(0);
    let fraction = rand::rng().random_range(0.75..0.80);
    Some(now_ms + (lifetime as f64 * fraction) as i64)
}

/// When to check health next: a random point within one interval, so checks spread out.
pub fn schedule_check(app: &App, now_ms: i64, first: bool) -> i64 {
    let interval = i64::try_from(app.config.jobs.health_check_interval_secs).unwrap_or(86_400).max(1) * 1000;
    let low = if first { 0.5 } else { 0.9 };
    now_ms + (interval as f64 * rand::rng().random_range(low..1.1)) as i64
}

/// The wait after `failures` consecutive transient failures: exponential from 30 s, capped at
/// an hour, with jitter, and never shorter than the provider's `Retry-After`.
pub fn backoff(failures: i64, retry_after: Option<Duration>) -> Duration {
    let exp = u32::try_from(failures.clamp(1, 8) - 1).unwrap_or(0);
    let base = (30u64 << exp).min(3600);
    let jittered = (base as f64 * rand::rng().random_range(0.5..1.0)) as u64;
    Duration::from_secs(jittered.max(retry_after.map_or(0, |r| r.as_secs())))
}

/// How a refresh ended.
#[derive(Debug)]
pub enum Outcome {
    /// New tokens are stored.
    Refreshed(Box<ConnectionRow>),
    /// Nothing to do: not due, or someone else refreshed meanwhile.
    Current(Box<ConnectionRow>),
    /// Temporarily impossible; retried later. The connection is unchanged.
    Transient(String),
    /// The grant is dead: the connection is now broken.
    Broken(String),
}

/// Refreshes one connection now if `force` or if it is due (within `margin_ms` of expiry),
/// honouring every single-flight rule. Waits for a refresh in flight elsewhere.
pub async fn refresh(app: &App, id: &str, force: bool, margin_ms: i64) -> ServiceResult<Outcome> {
    let lock = connection_lock(id);
    let _guard = lock.lock().await;
    let owner = owner_id();
    let lease = i64::try_from(app.config.jobs.lease_secs).unwrap_or(60) * 1000;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(u64::try_from(lease).unwrap_or(60_000) + 5000);
    let mut seen_generation: Option<i64> = None;
    loop {
        let mut conn = app.db.read().await?;
        let row = db::connections::get(&mut conn, id).await?.ok_or(ServiceError::NotFound("connection"))?;
        if ConnectionStatus::parse(&row.status) != ConnectionStatus::Active {
            return Ok(Outcome::Current(Box::new(row)));
        }
        let now = app.now_ms();
        let due = row.access_expires_at.is_none_or(|e| e - now < margin_ms);
        let refreshed_meanwhile = seen_generation.is_some_and(|g| g != row.token_generation);
        if refreshed_meanwhile || (!force && !due) {
            return Ok(Outcome::Current(Box::new(row)));
        }
        seen_generation.get_or_insert(row.token_generation);
        drop(conn);
        let leased =
            db::connections::try_lease(&mut *app.db.writer().await?, id, owner, now, now + lease).await?;
        if leased {
            return run_leased(app, row, owner).await;
        }
        // Another process is refreshing: wait for its result instead of starting another.
        if tokio::time::Instant::now() > deadline {
            return Ok(Outcome::Transient("another refresh of this connection is still running".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a refresh for a connection whose lease `owner` holds (the scheduler's path). Takes the
/// in-process lock too.
pub async fn refresh_claimed(app: &App, id: &str) -> ServiceResult<Outcome> {
    let lock = connection_lock(id);
    let _guard = lock.lock().await;
    let owner = owner_id();
    let now = app.now_ms();
    if app.db.backend() == db::Backend::Postgres {
        // Reading the row and recording the attempt are one statement here.
        let attempt_id = new_id();
        let start = db::connections::start_claimed_refresh(
            &mut *app.db.writer().await?,
            id,
            owner,
            &attempt_id,
            now,
            app.providers.enabled_names(),
        )
        .await?
        .ok_or(ServiceError::NotFound("connection"))?;
        if start.started {
            let (platform, provider) = provider_of(app, &start.row)?;
            return run_attempt(app, start.row, owner, attempt_id, platform, provider).await;
        }
        return not_started(app, start.row, owner, now).await;
    }
    let mut conn = app.db.read().await?;
    let Some(row) = db::connections::get(&mut conn, id).await? else {
        return Err(ServiceError::NotFound("connection"));
    };
    drop(conn);
    let still_ours = row.lease_owner.as_deref() == Some(owner) && row.lease_until.is_some_and(|u| u > now);
    let still_due = row.next_refresh_at.is_some_and(|n| n <= now);
    if !still_ours || ConnectionStatus::parse(&row.status) != ConnectionStatus::Active || !still_due {
        return not_started(app, row, owner, now).await;
    }
    run_leased(app, row, owner).await
}

/// A claimed connection that is not to be refreshed after all: refreshed on demand meanwhile,
/// no longer active, its lease ran out and another process took it, or its provider is not
/// served here. Gives the lease back if this process still holds it.
async fn not_started(app: &App, row: ConnectionRow, owner: &str, now: i64) -> ServiceResult<Outcome> {
    let still_ours = row.lease_owner.as_deref() == Some(owner) && row.lease_until.is_some_and(|u| u > now);
    if still_ours {
        let mut conn = app.db.writer().await?;
        db::connections::release_lease(&mut conn, &row.id, owner).await?;
    }
    let still_due = row.next_refresh_at.is_some_and(|n| n <= now);
    if still_ours && still_due && ConnectionStatus::parse(&row.status) == ConnectionStatus::Active {
        provider_of(app, &row)?;
    }
    Ok(Outcome::Current(Box::new(row)))
}

fn provider_of<'a>(app: &'a App, row: &ConnectionRow) -> ServiceResult<(Platform, &'a Provider)> {
    let platform: Platform = row.provider.parse().map_err(|_| ServiceError::NotFound("connection"))?;
    let provider = app.providers.get(platform).ok_or_else(|| {
        ServiceError::Conflict(format!("{} is not enabled on this instance", platform.display_name()))
    })?;
    Ok((platform, provider))
}

/// The refresh itself; the caller holds the lease and the in-process lock.
async fn run_leased(app: &App, row: ConnectionRow, owner: &str) -> ServiceResult<Outcome> {
    let (platform, provider) = match provider_of(app, &row) {
        Ok(p) => p,
        Err(e) => {
            let mut conn = app.db.writer().await?;
            db::connections::release_lease(&mut conn, &row.id, owner).await?;
            return Err(e);
        }
    };
    let attempt_id = new_id();
    // Recorded before the provider is called, in one statement: a crash between the provider's
    // answer and our commit leaves this attempt `started`, and whichever attempt finishes next
    // marks it interrupted (see `finish_attempts`).
    db::connections::insert_attempt(
        &mut *app.db.writer().await?,
        &AttemptRow {
            id: attempt_id.clone(),
            connection_id: row.id.clone(),
            owner: owner.to_string(),
            generation: row.token_generation,
            outcome: "started".into(),
            detail: None,
            started_at: app.now_ms(),
            finished_at: None,
        },
    )
    .await?;
    run_attempt(app, row, owner, attempt_id, platform, provider).await
}

/// Calls the provider for attempt `attempt_id`, already recorded as started, and stores the
/// outcome; counts it for the metrics.
async fn run_attempt(
    app: &App,
    row: ConnectionRow,
    owner: &str,
    attempt_id: String,
    platform: Platform,
    provider: &Provider,
) -> ServiceResult<Outcome> {
    let result = call_and_store(app, row, owner, attempt_id, platform, provider).await;
    let outcome = match &result {
        Ok(Outcome::Refreshed(_)) => "refreshed",
        Ok(Outcome::Current(_)) => "superseded",
        Ok(Outcome::Transient(_)) => "transient_failure",
        Ok(Outcome::Broken(_)) => "broken",
        Err(_) => "error",
    };
    metrics::counter!("authlink_refreshes_total", "provider" => platform.as_str(), "outcome" => outcome)
        .increment(1);
    result
}

async fn call_and_store(
    app: &App,
    mut row: ConnectionRow,
    owner: &str,
    attempt_id: String,
    platform: Platform,
    provider: &Provider,
) -> ServiceResult<Outcome> {
    let access: SecretString = match row.access_token_sealed.as_deref() {
        Some(s) => app.keys.open_str(s, access_aad(&row.id))?,
        None => {
            return finish_broken(app, &mut row, owner, &attempt_id, |_| {
                "The connection holds no token.".into()
            })
            .await;
        }
    };
    let refresh_token: Option<SecretString> = match row.refresh_token_sealed.as_deref() {
        Some(s) => Some(app.keys.open_str(s, refresh_aad(&row.id))?),
        None => None,
    };
    let result = provider.refresh(&access, refresh_token.as_ref(), app.now()).await;
    match result {
        Ok(tokens) => {
            let generation = row.token_generation;
            let previous_failures = row.refresh_failures;
            connections::apply_tokens(app, &mut row, &tokens);
            let now = app.now_ms();
            row.last_refreshed_at = Some(now);
            row.updated_at = now;
            row.refresh_failures = 0;
            row.expiring_notified_at = None;
            row.next_refresh_at = schedule_refresh(now, row.access_expires_at);
            // Storing the answer must not be lost to a passing database hiccup: retry a few
            // times; the attempt row explains the gap if every try fails.
            let mut last_error = None;
            for wait_ms in [0u64, 200, 1000, 3000] {
                if wait_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                }
                match store_refreshed(app, &row, generation, owner, &attempt_id, previous_failures, platform)
                    .await
                {
                    Ok(stored) => return Ok(stored),
                    Err(e @ ServiceError::Db(crate::db::DbError::Unavailable(_))) => last_error = Some(e),
                    Err(e) => return Err(e),
                }
            }
            tracing::error!(connection_id = %row.id, "refreshed tokens could not be stored; the attempt stays recorded as started");
            Err(last_error.unwrap_or(ServiceError::Unavailable("the database is unavailable".into())))
        }
        Err(ProviderError::Transient { reason, retry_after }) => {
            finish_transient(app, &mut row, owner, &attempt_id, &reason, retry_after, platform).await
        }
        Err(ProviderError::Rejected { reason }) => {
            // Our request was refused (credentials, configuration, refreshing too early): not the
            // client's fault, so not a broken connection; retried later and logged loudly.
            tracing::error!(connection_id = %row.id, provider = %platform, reason = %reason, "refresh request rejected by the provider");
            finish_transient(app, &mut row, owner, &attempt_id, &reason, None, platform).await
        }
        Err(ProviderError::Permanent { reason }) | Err(ProviderError::Scope { reason }) => {
            let why = |interrupted: bool| {
                if interrupted {
                    format!(
                        "{} refused the stored token ({reason}). An earlier refresh was interrupted after the provider \
                         may have issued new tokens; the client must reconnect through the link.",
                        platform.display_name()
                    )
                } else {
                    format!(
                        "{} refused the token ({reason}); the client must reconnect through the link.",
                        platform.display_name()
                    )
                }
            };
            finish_broken(app, &mut row, owner, &attempt_id, why).await
        }
    }
}

async fn store_refreshed(
    app: &App,
    row: &ConnectionRow,
    generation: i64,
    owner: &str,
    attempt_id: &str,
    previous_failures: i64,
    platform: Platform,
) -> ServiceResult<Outcome> {
    let now = app.now_ms();
    if app.db.backend() == db::Backend::Postgres && previous_failures < REFRESH_FAILED_THRESHOLD {
        // The common case in one statement; a recovery (which also emits a webhook) and a
        // superseded refresh take the general path below.
        let stored = db::connections::store_refreshed_with_history(
            &mut *app.db.writer().await?,
            row,
            generation,
            owner,
            attempt_id,
            (&new_id(), INTERRUPTED_DETAIL),
            &new_id(),
        )
        .await?;
        if stored {
            tracing::debug!(connection_id = %row.id, provider = %platform, "tokens refreshed");
            return Ok(Outcome::Refreshed(Box::new(row.clone())));
        }
    }
    let mut tx = app.db.begin_write().await?;
    if !db::connections::store_refreshed(&mut tx, row, generation, owner).await? {
        // Another writer stored newer tokens (a reconnect meanwhile): ours are older; keep theirs.
        let interrupted = db::connections::finish_attempts(
            &mut tx,
            &row.id,
            attempt_id,
            "superseded",
            Some("newer tokens were stored meanwhile"),
            now,
        )
        .await?;
        record_interrupted(&mut tx, row, interrupted, now).await?;
        db::connections::release_lease(&mut tx, &row.id, owner).await?;
        let current =
            db::connections::get(&mut tx, &row.id).await?.ok_or(ServiceError::NotFound("connection"))?;
        tx.commit().await?;
        return Ok(Outcome::Current(Box::new(current)));
    }
    let interrupted =
        db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "succeeded", None, now).await?;
    record_interrupted(&mut tx, row, interrupted, now).await?;
    db::connections::insert_event(&mut tx, &connections::event(row, "refreshed", None, now)).await?;
    if previous_failures >= REFRESH_FAILED_THRESHOLD {
        db::connections::insert_event(
            &mut tx,
            &connections::event(
                row,
                "recovered",
                Some(format!("Refreshed after {previous_failures} failed attempts.")),
                now,
            ),
        )
        .await?;
        let data = connections::event_data(&mut tx, app, row, None).await?;
        webhooks::emit(&mut tx, app, now, &row.workspace_id, "connection.recovered", data).await?;
    }
    tx.commit().await?;
    tracing::debug!(connection_id = %row.id, provider = %platform, "tokens refreshed");
    Ok(Outcome::Refreshed(Box::new(row.clone())))
}

async fn finish_transient(
    app: &App,
    row: &mut ConnectionRow,
    owner: &str,
    attempt_id: &str,
    reason: &str,
    retry_after: Option<Duration>,
    platform: Platform,
) -> ServiceResult<Outcome> {
    let now = app.now_ms();
    row.refresh_failures += 1;
    let wait = backoff(row.refresh_failures, retry_after);
    row.next_refresh_at = Some(now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2));
    row.updated_at = now;
    let mut tx = app.db.begin_write().await?;
    db::connections::update(&mut tx, row).await?;
    db::connections::release_lease(&mut tx, &row.id, owner).await?;
    let interrupted =
        db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "transient", Some(reason), now)
            .await?;
    record_interrupted(&mut tx, row, interrupted, now).await?;
    if row.refresh_failures == REFRESH_FAILED_THRESHOLD {
        let detail =
            format!("{} refresh attempts failed; still retrying. Last error: {reason}", row.refresh_failures);
        db::connections::insert_event(
            &mut tx,
            &connections::event(row, "refresh_failed", Some(detail.clone()), now),
        )
        .await?;
        let data = connections::event_data(&mut tx, app, row, Some(&detail)).await?;
        webhooks::emit(&mut tx, app, now, &row.workspace_id, "connection.refresh_failed", data).await?;
    }
    tx.commit().await?;
    tracing::warn!(connection_id = %row.id, provider = %platform, failures = row.refresh_failures,
        retry_in_secs = wait.as_secs(), reason = %reason, "token refresh failed; will retry");
    Ok(Outcome::Transient(reason.to_string()))
}

/// Breaks the connection with the reason `why` gives, told whether an earlier attempt was found
/// interrupted (which explains a refused token).
async fn finish_broken(
    app: &App,
    row: &mut ConnectionRow,
    owner: &str,
    attempt_id: &str,
    why: impl FnOnce(bool) -> String,
) -> ServiceResult<Outcome> {
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let interrupted =
        db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "permanent", None, now).await?;
    record_interrupted(&mut tx, row, interrupted, now).await?;
    let reason = why(interrupted > 0);
    db::connections::set_attempt_detail(&mut tx, attempt_id, &reason).await?;
    connections::mark_broken_in(&mut tx, app, row, &reason, now).await?;
    db::connections::release_lease(&mut tx, &row.id, owner).await?;
    tx.commit().await?;
    Ok(Outcome::Broken(reason))
}

/// The history detail of a `refresh_interrupted` event.
const INTERRUPTED_DETAIL: &str =
    "A previous refresh stopped between calling the provider and storing its answer.";

/// The event that explains an interrupted refresh, when one was found.
async fn record_interrupted(
    tx: &mut sqlx::AnyConnection,
    row: &ConnectionRow,
    interrupted: u64,
    now: i64,
) -> ServiceResult<()> {
    if interrupted > 0 {
        db::connections::insert_event(
            tx,
            &connections::event(row, "refresh_interrupted", Some(INTERRUPTED_DETAIL.into()), now),
        )
        .await?;
    }
    Ok(())
}

/// The health check: a cheap profile call that catches revocations early and keeps the
/// handle, display name and avatar current. A refused token breaks the connection; a transient
/// failure only moves the next check closer.
pub async fn check(app: &App, id: &str) -> ServiceResult<Outcome> {
    // A token that is about to expire is refreshed first, so the check tests the grant, not the
    // token's age.
    match refresh(app, id, false, connections::REFRESH_MARGIN_SECS * 1000).await? {
        Outcome::Broken(reason) => return Ok(Outcome::Broken(reason)),
        Outcome::Transient(reason) => return Ok(Outcome::Transient(reason)),
        Outcome::Current(_) | Outcome::Refreshed(_) => {}
    }
    let lock = connection_lock(id);
    let _guard = lock.lock().await;
    let mut conn = app.db.read().await?;
    let Some(mut row) = db::connections::get(&mut conn, id).await? else {
        return Err(ServiceError::NotFound("connection"));
    };
    drop(conn);
    if ConnectionStatus::parse(&row.status) != ConnectionStatus::Active {
        return Ok(Outcome::Current(Box::new(row)));
    }
    let (platform, provider) = provider_of(app, &row)?;
    let Some(sealed) = row.access_token_sealed.as_deref() else {
        return Ok(Outcome::Current(Box::new(row)));
    };
    let token = app.keys.open_str(sealed, access_aad(&row.id))?;
    let result = provider.fetch_profile(&token).await;
    let now = app.now_ms();
    match result {
        Ok(profile) => {
            row.username = profile.username.or(row.username);
            row.display_name = profile.display_name.or(row.display_name);
            row.avatar_url = profile.avatar_url.or(row.avatar_url);
            row.last_checked_at = Some(now);
            row.next_check_at = Some(schedule_check(app, now, false));
            row.updated_at = now;
            let mut tx = app.db.begin_write().await?;
            // Only the profile columns change here; tokens were not touched.
            let current = db::connections::get(&mut tx, &row.id).await?;
            if let Some(mut current) = current {
                current.username = row.username.clone();
                current.display_name = row.display_name.clone();
                current.avatar_url = row.avatar_url.clone();
                current.last_checked_at = row.last_checked_at;
                current.next_check_at = row.next_check_at;
                current.updated_at = now;
                db::connections::update(&mut tx, &current).await?;
                row = current;
            }
            tx.commit().await?;
            Ok(Outcome::Current(Box::new(row)))
        }
        Err(ProviderError::Permanent { reason }) | Err(ProviderError::Scope { reason }) => {
            let why = format!(
                "{} rejected the token on a health check ({reason}); the client must reconnect through the link.",
                platform.display_name()
            );
            let mut tx = app.db.begin_write().await?;
            connections::mark_broken_in(&mut tx, app, &mut row, &why, now).await?;
            tx.commit().await?;
            Ok(Outcome::Broken(why))
        }
        Err(ProviderError::Transient { reason, .. }) | Err(ProviderError::Rejected { reason }) => {
            let mut conn = app.db.writer().await?;
            db::connections::set_next_check(&mut conn, &row.id, now + 3_600_000).await?;
            Ok(Outcome::Transient(reason))
        }
    }
}

/// Announces `connection.expiring` for grants that run out soon (once per grant).
pub async fn announce_expiring(app: &App) -> ServiceResult<usize> {
    let now = app.now_ms();
    let soon = now + i64::try_from(app.config.jobs.expiring_notice_secs).unwrap_or(0) * 1000;
    let mut conn = app.db.read().await?;
    let rows = db::connections::expiring(&mut conn, now, soon, 100).await?;
    drop(conn);
    let count = rows.len();
    for mut row in rows {
        let until = row.refresh_expires_at.or(row.access_expires_at).unwrap_or(now);
        let detail = if until <= now {
            "The grant has run out and can no longer be refreshed; the client must reconnect through the link.".to_string()
        } else {
            let at = crate::clock::from_millis(until)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            format!("The grant runs out at {at} unless the client reconnects through the link.")
        };
        row.expiring_notified_at = Some(now);
        row.updated_at = now;
        let mut tx = app.db.begin_write().await?;
        db::connections::update(&mut tx, &row).await?;
        db::connections::insert_event(
            &mut tx,
            &connections::event(&row, "expiring", Some(detail.clone()), now),
        )
        .await?;
        let data = connections::event_data(&mut tx, app, &row, Some(&detail)).await?;
        webhooks::emit(&mut tx, app, now, &row.workspace_id, "connection.expiring", data).await?;
        audit::record(
            &mut tx,
            now,
            &Actor::System,
            Some(&row.workspace_id),
            "connection.expiring",
            "connection",
            &row.id,
            serde_json::json!({"until_ms": until}),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(count)
}

/// Claims a batch of due refreshes for this process (the scheduler's query).
pub async fn claim_batch(app: &App) -> ServiceResult<Vec<String>> {
    let now = app.now_ms();
    let lease = i64::try_from(app.config.jobs.lease_secs).unwrap_or(60) * 1000;
    let mut tx = app.db.begin_write().await?;
    let ids = db::connections::claim_due_refreshes(
        &mut tx,
        app.db.backend(),
        owner_id(),
        now,
        now + lease,
        i64::from(app.config.jobs.refresh_batch),
    )
    .await?;
    tx.commit().await?;
    Ok(ids)
}

/// The current time in database form (helper for callers without an `App` clock at hand).
pub fn now_ms(app: &App) -> i64 {
    to_millis(app.now())
}
