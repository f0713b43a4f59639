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
//!
//! Two provider rules shape what counts as a failure (providers.md §3.5, §9.3):
//! - Instagram refreshes a token only once it is 24 hours old. A younger token is never sent to
//!   it: the refresh is deferred (a forced one answers [`Requested::NotYet`]) and nothing counts
//!   as a failure. Should Instagram refuse a refresh all the same (its answer for "too early" is
//!   unconfirmed), a profile call tells whether the token still works; if it does, the refusal is
//!   about its age, and the refresh is deferred too.
//! - TikTok's `access_token_invalid` is permanent only after a refresh: a health check that gets
//!   it refreshes once (through the same single-flight path) and asks again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};

use super::connections::{self, ConnectionStatus, access_aad, refresh_aad};
use super::{Actor, ServiceError, ServiceResult, audit, webhooks};
use crate::clock::to_millis;
use crate::db::connections::{AttemptRow, ConnectionRow, Indexed};
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

/// The in-process locks of connections, by id.
static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();

/// The in-process lock of one connection.
pub fn connection_lock(id: &str) -> Arc<tokio::sync::Mutex<()>> {
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

/// The answer to a refresh asked for by a person (API `POST /connections/{id}/refresh`, CLI
/// `connection refresh`).
#[derive(Debug)]
pub enum Requested {
    /// The refresh ran, or was not needed: see [`Outcome`].
    Done(Outcome),
    /// The provider does not refresh this token yet (Instagram: not before it is 24 hours old).
    /// It was not asked, the token is unchanged and still valid, and nothing counts as a failure;
    /// `message` says when a refresh becomes possible.
    NotYet {
        /// The connection, unchanged.
        row: Box<ConnectionRow>,
        /// What happened, in words.
        message: String,
    },
}

/// What the refresh machinery did, before it is told to a caller.
enum Step {
    /// See [`Outcome`].
    Done(Outcome),
    /// See [`Requested::NotYet`].
    NotYet { row: Box<ConnectionRow>, message: String },
}

impl From<Step> for Outcome {
    fn from(step: Step) -> Self {
        match step {
            Step::Done(outcome) => outcome,
            // The token is as good as it was: nothing to do for now.
            Step::NotYet { row, .. } => Outcome::Current(row),
        }
    }
}

/// Why a refresh runs, for the reason given when the provider refuses it.
#[derive(Debug, Clone, Copy)]
enum Cause<'a> {
    /// It is due, forced, or needed for an access token.
    Plain,
    /// The provider refused the access token on a health check, for this reason; the refresh is
    /// the second chance providers.md §9.3 gives such a token.
    AccessRefused(&'a str),
}

/// Refreshes one connection now if `force` or if it is due (within `margin_ms` of expiry),
/// honouring every single-flight rule. Waits for a refresh in flight (in this process or another)
/// for at most `wait` (default: as long as its lease may last), then answers
/// [`Outcome::Transient`]. A token the provider does not refresh yet is left as it is
/// ([`Outcome::Current`]).
pub async fn refresh(
    app: &App,
    id: &str,
    force: bool,
    margin_ms: i64,
    wait: Option<Duration>,
) -> ServiceResult<Outcome> {
    Ok(refresh_step(app, id, force, margin_ms, None, Cause::Plain, wait).await?.into())
}

/// A refresh asked for by a person: [`refresh`] forced, telling apart a token the provider does
/// not refresh yet. With `seen_generation` (the token generation the asker saw), a refresh that
/// another finished meanwhile is its answer ([`Outcome::Current`]): requests queued behind one
/// another (or left by callers who stopped waiting) do not each rotate the tokens again.
pub async fn refresh_requested(
    app: &App,
    id: &str,
    seen_generation: Option<i64>,
) -> ServiceResult<Requested> {
    Ok(match refresh_step(app, id, true, 0, seen_generation, Cause::Plain, None).await? {
        Step::Done(outcome) => Requested::Done(outcome),
        Step::NotYet { row, message } => Requested::NotYet { row, message },
    })
}

/// [`refresh`]; with `generation`, only if the stored tokens are still of that generation (a
/// newer one means someone refreshed meanwhile: nothing to do). A refresh in flight is waited for
/// for at most `wait` (default: as long as its lease may last, and five seconds more).
async fn refresh_step(
    app: &App,
    id: &str,
    force: bool,
    margin_ms: i64,
    generation: Option<i64>,
    cause: Cause<'_>,
    wait: Option<Duration>,
) -> ServiceResult<Step> {
    let owner = owner_id();
    let lease = i64::try_from(app.config.jobs.lease_secs).unwrap_or(60) * 1000;
    let wait = wait.unwrap_or_else(|| Duration::from_millis(u64::try_from(lease).unwrap_or(60_000) + 5000));
    let deadline = tokio::time::Instant::now() + wait;
    let still_running =
        || Step::Done(Outcome::Transient("another refresh of this connection is still running".into()));
    // Another task of this process may be refreshing it: wait for it within the same bound.
    let lock = connection_lock(id);
    let Ok(_guard) = tokio::time::timeout_at(deadline, lock.lock()).await else {
        return Ok(still_running());
    };
    let mut seen_generation: Option<i64> = generation;
    loop {
        let mut conn = app.db.read().await?;
        let row = db::connections::get(&mut conn, id).await?.ok_or(ServiceError::NotFound("connection"))?;
        if ConnectionStatus::parse(&row.status) != ConnectionStatus::Active {
            return Ok(Step::Done(Outcome::Current(Box::new(row))));
        }
        let now = app.now_ms();
        let due = row.access_expires_at.is_none_or(|e| e - now < margin_ms);
        let refreshed_meanwhile = seen_generation.is_some_and(|g| g != row.token_generation);
        if refreshed_meanwhile || (!force && !due) {
            return Ok(Step::Done(Outcome::Current(Box::new(row))));
        }
        let (platform, provider) = provider_of(app, &row)?;
        if let Some(from) = refreshable_from(provider, &row).filter(|from| now < *from) {
            let message = too_young(platform, &row, from);
            return Ok(Step::NotYet { row: Box::new(row), message });
        }
        seen_generation.get_or_insert(row.token_generation);
        drop(conn);
        let leased =
            db::connections::try_lease(&mut *app.db.writer().await?, id, owner, now, now + lease).await?;
        if leased {
            // Read again under the lease: the row read before it may predate a refresh another
            // process finished (and gave its lease back) in between, whose rotated token this one
            // must not send again, and the lease's end bounds how long the result may be retried.
            let mut conn = app.db.read().await?;
            let fresh = db::connections::get(&mut conn, id).await?;
            drop(conn);
            match fresh {
                Some(fresh)
                    if fresh.token_generation == row.token_generation
                        && ConnectionStatus::parse(&fresh.status) == ConnectionStatus::Active =>
                {
                    return run_leased(app, fresh, owner, cause).await;
                }
                // Changed meanwhile: give the lease back and look again.
                _ => db::connections::release_lease(&mut *app.db.writer().await?, id, owner).await?,
            }
            continue;
        }
        // Another process is refreshing: wait for its result instead of starting another.
        if tokio::time::Instant::now() > deadline {
            return Ok(still_running());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// When the provider starts accepting a refresh of the connection's current token (ms), for
/// providers with a minimum age: the token was obtained at the last refresh, or at the
/// (re)connection, which also records itself as `last_refreshed_at`.
fn refreshable_from(provider: &Provider, row: &ConnectionRow) -> Option<i64> {
    let age = provider.min_refresh_age()?;
    let obtained = row.last_refreshed_at.unwrap_or(row.connected_at);
    Some(obtained.saturating_add(i64::try_from(age.whole_milliseconds()).unwrap_or(i64::MAX)))
}

/// Says why a token too young to be refreshed was left as it is.
fn too_young(platform: Platform, row: &ConnectionRow, from: i64) -> String {
    let at = |ms: i64| {
        crate::clock::from_millis(ms)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let obtained = row.last_refreshed_at.unwrap_or(row.connected_at);
    let mut message = format!(
        "Not refreshed: {} refreshes a token only once it is 24 hours old, and this one was obtained at {}; \
         it can be refreshed from {}.",
        platform.display_name(),
        at(obtained),
        at(from)
    );
    if let Some(expires) = row.access_expires_at {
        message.push_str(&format!(" The token is unchanged and valid until {}.", at(expires)));
    }
    message
}

/// Takes the refresh lease of an active connection for work that must not overlap a refresh in
/// any process (a disconnect revoking the grant: a refresh meanwhile would rotate the tokens it
/// revokes, or meet the revoked grant and report the connection broken), waiting up to `wait`
/// for a refresh in flight elsewhere to end. The caller holds the in-process lock. Returns
/// whether this process now holds the lease: not when the connection is not active (nothing
/// refreshes it) or when the holder outlasted `wait`.
pub(crate) async fn take_lease_waiting(app: &App, id: &str, wait: Duration) -> ServiceResult<bool> {
    let lease = i64::try_from(app.config.jobs.lease_secs).unwrap_or(60) * 1000;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = app.now_ms();
        if db::connections::try_lease(&mut *app.db.writer().await?, id, owner_id(), now, now + lease).await? {
            return Ok(true);
        }
        let row = db::connections::get(&mut *app.db.read().await?, id).await?;
        let active = row.is_some_and(|r| ConnectionStatus::parse(&r.status) == ConnectionStatus::Active);
        if !active || tokio::time::Instant::now() > deadline {
            return Ok(false);
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
            now + start_margin_ms(app),
            app.providers.served(),
        )
        .await?
        .ok_or(ServiceError::NotFound("connection"))?;
        if start.started {
            let (platform, provider) = provider_of(app, &start.row)?;
            return Ok(run_attempt(app, start.row, owner, attempt_id, platform, provider, Cause::Plain)
                .await?
                .into());
        }
        return not_started(app, start.row, owner, now).await;
    }
    let mut conn = app.db.read().await?;
    let Some(row) = db::connections::get(&mut conn, id).await? else {
        return Err(ServiceError::NotFound("connection"));
    };
    drop(conn);
    // Started only while the claim outlasts a whole provider call and the store after it: a
    // claim about to run out could be taken over mid-call by another process, which would send
    // the same refresh token.
    let lease_left = row.lease_until.is_some_and(|u| u > now + start_margin_ms(app));
    let still_ours = row.lease_owner.as_deref() == Some(owner) && lease_left;
    let still_due = row.next_refresh_at.is_some_and(|n| n <= now);
    if !still_ours || ConnectionStatus::parse(&row.status) != ConnectionStatus::Active || !still_due {
        return not_started(app, row, owner, now).await;
    }
    Ok(run_leased(app, row, owner, Cause::Plain).await?.into())
}

/// What must be left of a claim to start a refresh (ms): the longest a provider call may take,
/// and time to store its answer after it ([`STORE_MARGIN_MS`], or half of what the claim leaves
/// beyond the call when claims are shorter).
fn start_margin_ms(app: &App) -> i64 {
    start_margin(app.config.providers.timeout_secs, app.config.jobs.lease_secs)
}

/// [`start_margin_ms`] for a provider timeout and a lease length (seconds; the configuration
/// keeps the lease longer than the timeout).
fn start_margin(timeout_secs: u64, lease_secs: u64) -> i64 {
    let call = i64::try_from(timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
    let lease = i64::try_from(lease_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
    call + STORE_MARGIN_MS.min((lease - call) / 2)
}

/// Time kept on a claim, beyond a provider call, for storing the call's answer (as webhook
/// deliveries keep theirs).
const STORE_MARGIN_MS: i64 = 10_000;

/// A claimed connection that is not to be refreshed after all: refreshed on demand meanwhile,
/// no longer active, its lease ran out and another process took it, or its provider is not
/// served here. Gives the lease back if this process still holds it.
async fn not_started(app: &App, row: ConnectionRow, owner: &str, now: i64) -> ServiceResult<Outcome> {
    let still_ours = row.lease_owner.as_deref() == Some(owner) && row.lease_until.is_some_and(|u| u > now);
    if still_ours {
        let mut conn = app.db.writer().await?;
        db::connections::release_lease(&mut conn, &row.id, owner).await?;
    }
    if ConnectionStatus::parse(&row.status) != ConnectionStatus::Active && row.next_refresh_at.is_some() {
        // With the connection's row locked: a repair committing meanwhile (which schedules
        // the connection again) is then either seen, or waits for this.
        let mut tx = app.db.begin_write().await?;
        let current = db::connections::get_for_update(&mut tx, app.db.backend(), &row.id).await?;
        if current.is_some_and(|c| ConnectionStatus::parse(&c.status) != ConnectionStatus::Active) {
            db::connections::unschedule_inactive(&mut tx, &row.id).await?;
        }
        tx.commit().await?;
    }
    let still_due = row.next_refresh_at.is_some_and(|n| n <= now);
    if still_ours && still_due && ConnectionStatus::parse(&row.status) == ConnectionStatus::Active {
        provider_of(app, &row)?;
    }
    Ok(Outcome::Current(Box::new(row)))
}

/// The provider `row`'s tokens may be sent to: refused (409, nothing sent) when it is not enabled
/// here, or runs in the other mode (see [`Providers::serving`](crate::providers::Providers::serving)).
fn provider_of<'a>(app: &'a App, row: &ConnectionRow) -> ServiceResult<(Platform, &'a Provider)> {
    let platform: Platform = row.provider.parse().map_err(|_| ServiceError::NotFound("connection"))?;
    let provider = app
        .providers
        .serving(platform, row.sandbox != 0)
        .map_err(|mode| ServiceError::Conflict(mode.explain(platform)))?;
    Ok((platform, provider))
}

/// How long a write that must not be lost is tried through a database outage (ms).
const STORE_RETRY_MS: i64 = 10 * 60 * 1000;

/// Runs `write` (of what a provider has just done: tokens it issued, a grant it revoked) until it
/// is done or fails for another reason than a database that cannot be reached, backing off, for
/// up to ten minutes; `what` names it in the log lines of connection `id`. The caller's request
/// may end meanwhile: the work it started goes on.
pub(crate) async fn through_outage<T, F, Fut>(app: &App, id: &str, what: &str, write: F) -> ServiceResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ServiceResult<T>>,
{
    retry_while_unavailable(|| app.now_ms(), id, what, write).await
}

/// [`through_outage`] by the clock `now_ms`.
async fn retry_while_unavailable<T, F, Fut>(
    now_ms: impl Fn() -> i64,
    id: &str,
    what: &str,
    mut write: F,
) -> ServiceResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ServiceResult<T>>,
{
    let until = now_ms() + STORE_RETRY_MS;
    let mut wait_ms = 0u64;
    loop {
        if wait_ms > 0 {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
        let error = match write().await {
            Err(e @ ServiceError::Db(crate::db::DbError::Unavailable(_))) => e,
            done => return done,
        };
        if wait_ms == 0 {
            tracing::warn!(connection_id = %id, error = %error, "{what} could not be stored yet; trying again");
        }
        wait_ms = (wait_ms * 2).clamp(200, 5000);
        if now_ms() + i64::try_from(wait_ms).unwrap_or(5000) > until {
            tracing::error!(connection_id = %id, error = %error, "{what} could not be stored within ten minutes; given up");
            return Err(error);
        }
    }
}

/// The refresh itself; the caller holds the lease and the in-process lock.
async fn run_leased(app: &App, row: ConnectionRow, owner: &str, cause: Cause<'_>) -> ServiceResult<Step> {
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
    run_attempt(app, row, owner, attempt_id, platform, provider, cause).await
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
    cause: Cause<'_>,
) -> ServiceResult<Step> {
    let result = call_and_store(app, row, owner, attempt_id, platform, provider, cause).await;
    let outcome = match &result {
        Ok(Step::Done(Outcome::Refreshed(_))) => "refreshed",
        Ok(Step::Done(Outcome::Current(_))) => "superseded",
        Ok(Step::Done(Outcome::Transient(_))) => "transient_failure",
        Ok(Step::Done(Outcome::Broken(_))) => "broken",
        Ok(Step::NotYet { .. }) => "deferred",
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
    cause: Cause<'_>,
) -> ServiceResult<Step> {
    // The scheduler claims by due time only: a token the provider would not refresh yet waits.
    if let Some(from) = refreshable_from(provider, &row).filter(|from| app.now_ms() < *from) {
        let message = too_young(platform, &row, from);
        let retry_at = from + rand::rng().random_range(0..300_000);
        return finish_not_yet(app, &mut row, owner, &attempt_id, retry_at, message).await;
    }
    let opened = (|| {
        let (access, refresh) = (row.access_token_sealed.as_deref(), row.refresh_token_sealed.as_deref());
        let access =
            access.map(|s| app.keys.open_str(s, access_aad(&row.workspace_id, &row.id))).transpose()?;
        let refresh =
            refresh.map(|s| app.keys.open_str(s, refresh_aad(&row.workspace_id, &row.id))).transpose()?;
        Ok::<_, crate::crypto::CryptoError>((access, refresh))
    })();
    let (access, refresh_token): (SecretString, Option<SecretString>) = match opened {
        Ok((Some(access), refresh)) => (access, refresh),
        Ok((None, _)) => {
            return finish_broken(app, &mut row, owner, &attempt_id, |_| {
                "The connection holds no token.".into()
            })
            .await;
        }
        // Sealed with a key this process does not hold (another process, started with a newer
        // master key, sealed them during a rotation): not the connection's fault; retried later,
        // by this process once restarted with that key or by another that holds it.
        Err(e @ crate::crypto::CryptoError::UnknownKey(_)) => {
            tracing::error!(connection_id = %row.id, error = %e, "the stored tokens need a key this process does not hold");
            let reason = format!("Not refreshed: the stored tokens are {e}; configure that master key");
            return finish_transient(app, &mut row, owner, &attempt_id, &reason, None, platform).await;
        }
        // Tokens that fail to open with the key they name (altered, or sealed for another
        // connection or workspace) cannot be sent to the provider, now or later: the connection
        // is broken, for the client to connect again, rather than claimed again and again at
        // every lease's end.
        Err(e) => {
            tracing::error!(connection_id = %row.id, error = %e, "the stored tokens cannot be opened");
            return finish_broken(app, &mut row, owner, &attempt_id, |_| {
                "The stored tokens cannot be opened with the configured master keys; the client must connect again."
                    .into()
            })
            .await;
        }
    };
    let mut result = provider.refresh(&access, refresh_token.as_ref(), app.now()).await;
    if provider.min_refresh_age().is_some()
        && let Err(refused) = &result
        && !refused.is_transient()
    {
        // The provider refused although the token is old enough by our records. Its answer for
        // "too early" is unconfirmed (a request error, maybe even an invalid-token 190), and its
        // other conditions are a live token that holds the basic scope, which a profile call
        // checks: if the token still works, the refusal can only be about its age.
        let verdict = match provider.fetch_profile(&access).await {
            Ok(_) => {
                let message = format!(
                    "Not refreshed: {} refused to refresh the token yet ({}), but the token still works; it is \
                     unchanged and the refresh is tried again later.",
                    platform.display_name(),
                    refused.reason()
                );
                let now = app.now_ms();
                let later = now + NOT_YET_RETRY_MS + rand::rng().random_range(0..NOT_YET_RETRY_MS / 10);
                // Before the token runs out if it can be, but never sooner than in five minutes
                // (a token refused this way near its end would be asked again every round).
                let retry_at =
                    row.access_expires_at.map_or(later, |e| later.min(e - 3_600_000)).max(now + 300_000);
                return finish_not_yet(app, &mut row, owner, &attempt_id, retry_at, message).await;
            }
            // The profile call says the token is dead: that is the verdict, whatever the refusal.
            Err(dead @ (ProviderError::Permanent { .. } | ProviderError::AccessTokenInvalid { .. }))
                if matches!(
                    refused,
                    ProviderError::Rejected { .. } | ProviderError::Misconfigured { .. }
                ) =>
            {
                Some(dead)
            }
            // The account is no longer a professional one: no refresh will make it work.
            Err(ProviderError::Rejected { reason })
                if crate::providers::instagram::names_personal_account(&reason) =>
            {
                Some(ProviderError::Permanent { reason })
            }
            // Whether the token still works cannot be told now: try again later.
            Err(
                ProviderError::Transient { .. }
                | ProviderError::Rejected { .. }
                | ProviderError::Misconfigured { .. },
            ) => Some(ProviderError::Transient { reason: refused.reason().to_string(), retry_after: None }),
            Err(_) => None,
        };
        if let Some(verdict) = verdict {
            result = Err(verdict);
        }
    }
    match result {
        Ok(tokens) => {
            let generation = row.token_generation;
            let previous_failures = row.refresh_failures;
            let scope_change = ScopeChange::between(
                &row.scopes,
                &tokens.scopes,
                &app.config.providers.required_scopes(platform),
                provider.scopes(),
            );
            if let Some(change) = &scope_change {
                row.scopes.clone_from(&change.now);
                row.status_reason.clone_from(&change.note);
            }
            connections::apply_tokens(app, &mut row, &tokens);
            if tokens.refresh_token.is_none()
                && let Some(kept) = &refresh_token
            {
                // The provider kept the refresh token (it sent none): it is sealed again with the
                // active key. The envelope read before the call may have been re-wrapped since;
                // writing it back would bring back a key the re-wrap moved every value off.
                row.refresh_token_sealed =
                    Some(app.keys.seal_str(kept.expose_secret(), refresh_aad(&row.workspace_id, &row.id)));
            }
            let now = app.now_ms();
            row.last_refreshed_at = Some(now);
            row.updated_at = now;
            row.refresh_failures = 0;
            row.expiring_notified_at = None;
            row.next_refresh_at = schedule_refresh(now, row.access_expires_at);
            // Storing the answer must not be lost to a database outage (a rotated refresh token
            // exists nowhere else), past this process's claim on the connection if need be. A
            // late store is safe: it compares the token generation and the status, so it keeps
            // nothing once another process has refreshed, broken or reconnected the connection;
            // and while the database cannot be reached, no other process can take the
            // connection over either (when the database refuses this process alone, it may:
            // then what was stored meanwhile stands). The attempt row explains the gap if every
            // try fails.
            let before =
                Before { generation, failures: previous_failures, scope_change: scope_change.as_ref() };
            let stored = through_outage(app, &row.id, "refreshed tokens", || {
                store_refreshed(app, &row, &before, owner, &attempt_id, platform)
            })
            .await?;
            Ok(Step::Done(stored))
        }
        Err(ProviderError::Transient { reason, retry_after }) => {
            finish_transient(app, &mut row, owner, &attempt_id, &reason, retry_after, platform).await
        }
        Err(ProviderError::Rejected { reason } | ProviderError::Misconfigured { reason }) => {
            // Our request was refused (credentials, configuration): not the client's fault, so
            // not a broken connection; retried later and logged loudly.
            tracing::error!(connection_id = %row.id, provider = %platform, reason = %reason, "refresh request rejected by the provider");
            finish_transient(app, &mut row, owner, &attempt_id, &reason, None, platform).await
        }
        Err(
            ProviderError::Permanent { reason }
            | ProviderError::Scope { reason }
            | ProviderError::AccessTokenInvalid { reason },
        ) => {
            let name = platform.display_name();
            let personal = crate::providers::instagram::names_personal_account(&reason);
            let why = |interrupted: bool| match (cause, interrupted) {
                _ if personal => personal_account_reason(platform, "after a refused refresh"),
                (Cause::AccessRefused(first), _) => format!(
                    "{name} rejected the access token on a health check ({first}) and refused the refresh that \
                     followed ({reason}); the client must reconnect through the link."
                ),
                (Cause::Plain, true) => format!(
                    "{name} refused the stored token ({reason}). An earlier refresh was interrupted after the provider \
                     may have issued new tokens; the client must reconnect through the link."
                ),
                (Cause::Plain, false) => {
                    format!(
                        "{name} refused the token ({reason}); the client must reconnect through the link."
                    )
                }
            };
            finish_broken(app, &mut row, owner, &attempt_id, why).await
        }
    }
}

/// The status reason of a connection whose Instagram account was switched to a personal one,
/// found `when`.
fn personal_account_reason(platform: Platform, when: &str) -> String {
    format!(
        "{} reports {when} that this account is no longer a professional one; the client must switch it back \
         to a Business or Creator account in the Instagram app and reconnect through the link.",
        platform.display_name()
    )
}

/// How the scopes a refresh reports differ from those stored (TikTok reports them with every
/// token; Instagram's refresh reports none, and then nothing changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScopeChange {
    /// The scopes now granted, comma-joined, in the provider's order.
    pub now: String,
    /// Scopes granted before and no longer.
    pub lost: Vec<String>,
    /// Of `lost`, those the operator requires (`providers.{name}.required_scopes`).
    pub lost_required: Vec<String>,
    /// Scopes granted now and not before.
    pub gained: Vec<String>,
    /// The status reason of a connection that keeps working: the requested scopes it is granted
    /// without, as the connect flow words it; `None` when it has them all.
    pub note: Option<String>,
}

impl ScopeChange {
    /// The change from `stored` (comma-separated) to `reported`, if the provider reported
    /// scopes and they differ. `required` and `requested` are the provider's configured scopes.
    pub fn between(
        stored: &str,
        reported: &[String],
        required: &[String],
        requested: &[String],
    ) -> Option<Self> {
        if reported.is_empty() {
            return None;
        }
        let before = connections::split_scopes(stored);
        let lost: Vec<String> = before.iter().filter(|s| !reported.contains(s)).cloned().collect();
        let gained: Vec<String> = reported.iter().filter(|s| !before.contains(s)).cloned().collect();
        if lost.is_empty() && gained.is_empty() {
            return None;
        }
        let lost_required = lost.iter().filter(|s| required.contains(s)).cloned().collect();
        let without: Vec<&str> =
            requested.iter().filter(|s| !reported.contains(s)).map(String::as_str).collect();
        let note = (!without.is_empty()).then(|| format!("Granted without {}.", without.join(", ")));
        Some(Self { now: reported.join(","), lost, lost_required, gained, note })
    }

    /// The status reason of a connection broken by the change (it lost a required scope).
    pub fn broken_reason(&self, platform: Platform) -> String {
        format!(
            "{} no longer grants {}, which this workspace requires; the client must reconnect through the link \
             and allow it again.",
            platform.display_name(),
            self.lost_required.join(", ")
        )
    }

    /// The history entry's words.
    pub fn detail(&self, platform: Platform) -> String {
        let mut parts = Vec::new();
        if !self.lost.is_empty() {
            parts.push(format!("no longer grants {}", self.lost.join(", ")));
        }
        if !self.gained.is_empty() {
            parts.push(format!("now also grants {}", self.gained.join(", ")));
        }
        format!("{} {}.", platform.display_name(), parts.join(" and "))
    }
}

/// The connection as it stands now, read in the write transaction `tx` and locked there, if its
/// tokens and status are still those of `row` (read before the provider was asked): a writer
/// that then changes only its own columns on it leaves every other writer's changes as they
/// are. `None` when it changed meanwhile (refreshed, reconnected, disconnected) or is gone.
async fn locked_if_unchanged(
    tx: &mut sqlx::AnyConnection,
    app: &App,
    row: &ConnectionRow,
) -> ServiceResult<Option<ConnectionRow>> {
    let current = db::connections::get_for_update(tx, app.db.backend(), &row.id).await?;
    Ok(current.filter(|c| c.token_generation == row.token_generation && c.status == row.status))
}

/// How long after the provider refused to refresh a token that still works the refresh is tried
/// again (ms).
const NOT_YET_RETRY_MS: i64 = 6 * 3_600_000;

/// Leaves a token the provider does not refresh yet as it is: nothing counts as a failure, the
/// next try is at `retry_at` (at least a minute away), and the attempt is recorded as deferred.
async fn finish_not_yet(
    app: &App,
    row: &mut ConnectionRow,
    owner: &str,
    attempt_id: &str,
    retry_at: i64,
    message: String,
) -> ServiceResult<Step> {
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    // Not over a row changed while the provider was asked (a reconnect, a disconnect); and only
    // the schedule, on the row as it stands now.
    if let Some(mut current) = locked_if_unchanged(&mut tx, app, row).await? {
        current.next_refresh_at = Some(retry_at.max(now + 60_000));
        current.updated_at = now;
        db::connections::update_changed(&mut tx, &current, Indexed::NONE).await?;
        *row = current;
    }
    db::connections::release_lease(&mut tx, &row.id, owner).await?;
    let interrupted =
        db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "deferred", Some(&message), now)
            .await?;
    record_interrupted(&mut tx, row, interrupted, now).await?;
    tx.commit().await?;
    tracing::info!(connection_id = %row.id, next_refresh_at = row.next_refresh_at, "refresh deferred: the provider does not refresh this token yet");
    Ok(Step::NotYet { row: Box::new(row.clone()), message })
}

/// What a successful refresh found of the connection as it stood before it.
struct Before<'a> {
    /// The token generation the refresh started from (compare-and-set).
    generation: i64,
    /// Failed refreshes in a row before this one.
    failures: i64,
    /// How the grant's scopes changed, if they did.
    scope_change: Option<&'a ScopeChange>,
}

async fn store_refreshed(
    app: &App,
    row: &ConnectionRow,
    before: &Before<'_>,
    owner: &str,
    attempt_id: &str,
    platform: Platform,
) -> ServiceResult<Outcome> {
    let &Before { generation, failures: previous_failures, scope_change } = before;
    let now = app.now_ms();
    if app.db.backend() == db::Backend::Postgres
        && previous_failures < REFRESH_FAILED_THRESHOLD
        && scope_change.is_none()
    {
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
        // Or the connection was broken or disconnected meanwhile: the answer is not kept.
        let current =
            db::connections::get(&mut tx, &row.id).await?.ok_or(ServiceError::NotFound("connection"))?;
        let why = if ConnectionStatus::parse(&current.status) == ConnectionStatus::Active {
            "newer tokens were stored meanwhile"
        } else {
            tracing::warn!(connection_id = %row.id, status = %current.status,
                "the connection stopped being active while its refresh ran; the refreshed tokens are not kept");
            "the connection was broken or disconnected meanwhile; the refreshed tokens were not kept"
        };
        let interrupted =
            db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "superseded", Some(why), now)
                .await?;
        record_interrupted(&mut tx, row, interrupted, now).await?;
        db::connections::release_lease(&mut tx, &row.id, owner).await?;
        tx.commit().await?;
        return Ok(Outcome::Current(Box::new(current)));
    }
    let interrupted =
        db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "succeeded", None, now).await?;
    record_interrupted(&mut tx, row, interrupted, now).await?;
    db::connections::insert_event(&mut tx, &connections::event(row, "refreshed", None, now)).await?;
    if let Some(change) = scope_change {
        // The grant changed at the provider (a client unticking a permission in the app's
        // settings): the new scopes are stored with the tokens, which work for what is left.
        db::connections::set_attempt_detail(&mut tx, attempt_id, &change.detail(platform)).await?;
        // On the row as it stands now, tokens just stored (locked): the copy read before the
        // provider was asked may predate another writer's change to its other columns.
        let mut changed = db::connections::get_for_update(&mut tx, app.db.backend(), &row.id)
            .await?
            .ok_or(ServiceError::NotFound("connection"))?;
        if let Some(broken) = store_scope_change(&mut tx, app, &mut changed, change, platform, now).await? {
            tx.commit().await?;
            return Ok(broken);
        }
    }
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
) -> ServiceResult<Step> {
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    // Not over a row changed while the provider was asked (a reconnect, a disconnect): its new
    // state stands, and the failure is not counted against it. Otherwise the failure is counted
    // on the row as it stands now, and only the count and the schedule are written.
    let written = match locked_if_unchanged(&mut tx, app, row).await? {
        Some(mut current) => {
            current.refresh_failures += 1;
            let wait = backoff(current.refresh_failures, retry_after);
            current.next_refresh_at = Some(now + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2));
            current.updated_at = now;
            db::connections::update_changed(&mut tx, &current, Indexed::NONE).await?;
            *row = current;
            true
        }
        None => false,
    };
    db::connections::release_lease(&mut tx, &row.id, owner).await?;
    let interrupted =
        db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "transient", Some(reason), now)
            .await?;
    record_interrupted(&mut tx, row, interrupted, now).await?;
    if written && row.refresh_failures == REFRESH_FAILED_THRESHOLD {
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
        next_refresh_at = row.next_refresh_at, reason = %reason, "token refresh failed; will retry");
    Ok(Step::Done(Outcome::Transient(reason.to_string())))
}

/// Breaks the connection with the reason `why` gives, told whether an earlier attempt was found
/// interrupted (which explains a refused token). A connection changed while the provider was
/// asked (a reconnect stored newer tokens, or it was disconnected) is left as it now stands, and
/// that is the outcome: the refusal was of tokens it no longer holds.
async fn finish_broken(
    app: &App,
    row: &mut ConnectionRow,
    owner: &str,
    attempt_id: &str,
    why: impl FnOnce(bool) -> String,
) -> ServiceResult<Step> {
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    let interrupted =
        db::connections::finish_attempts(&mut tx, &row.id, attempt_id, "permanent", None, now).await?;
    record_interrupted(&mut tx, row, interrupted, now).await?;
    let reason = why(interrupted > 0);
    db::connections::set_attempt_detail(&mut tx, attempt_id, &reason).await?;
    let marked = connections::mark_broken_if_unchanged(&mut tx, app, row, &reason, now).await?;
    db::connections::release_lease(&mut tx, &row.id, owner).await?;
    let outcome = refusal_outcome(&mut tx, marked, &row.id, reason).await?;
    tx.commit().await?;
    Ok(Step::Done(outcome))
}

/// What a refusal by the provider comes to, once [`connections::mark_broken_if_unchanged`] has
/// answered `marked`: the connection is broken; or, when it changed while the provider was asked
/// and so was not marked, the connection as it now stands (read in `tx`), whose tokens the
/// provider never refused.
async fn refusal_outcome(
    tx: &mut sqlx::AnyConnection,
    marked: bool,
    id: &str,
    reason: String,
) -> ServiceResult<Outcome> {
    if marked {
        return Ok(Outcome::Broken(reason));
    }
    Ok(match db::connections::get(tx, id).await? {
        Some(current) => Outcome::Current(Box::new(current)),
        None => Outcome::Broken(reason),
    })
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
/// failure only moves the next check closer. An access token refused with TikTok's
/// `access_token_invalid` gets one refresh first (providers.md §9.3): the connection breaks only
/// if the refresh is refused or the new token is refused too.
pub async fn check(app: &App, id: &str) -> ServiceResult<Outcome> {
    // A token that is about to expire is refreshed first, so the check tests the grant, not the
    // token's age.
    match refresh(app, id, false, connections::REFRESH_MARGIN_SECS * 1000, None).await? {
        Outcome::Broken(reason) => return Ok(Outcome::Broken(reason)),
        Outcome::Transient(reason) => return Ok(Outcome::Transient(reason)),
        Outcome::Current(_) | Outcome::Refreshed(_) => {}
    }
    let mut refused_first: Option<String> = None;
    loop {
        match check_profile(app, id, refused_first.as_deref()).await? {
            Checked::Done(Outcome::Current(row)) if refused_first.is_some() => {
                return Ok(Outcome::Refreshed(row));
            }
            Checked::Done(outcome) => return Ok(outcome),
            Checked::AccessRefused { generation, reason } => {
                // Through the single-flight path, and only if nobody refreshed meanwhile (then
                // the new token is simply asked again).
                let step =
                    refresh_step(app, id, true, 0, Some(generation), Cause::AccessRefused(&reason), None);
                match step.await? {
                    Step::Done(Outcome::Broken(why)) => return Ok(Outcome::Broken(why)),
                    Step::Done(Outcome::Transient(why)) => return Ok(Outcome::Transient(why)),
                    Step::Done(Outcome::Refreshed(_) | Outcome::Current(_)) | Step::NotYet { .. } => {}
                }
                refused_first = Some(reason);
            }
        }
    }
}

/// What one profile call of a health check found.
enum Checked {
    /// The check is over.
    Done(Outcome),
    /// The access token of `generation` was refused (TikTok `access_token_invalid`), for the
    /// first time in this check.
    AccessRefused { generation: i64, reason: String },
}

/// One profile call of a health check. `refused_first` is the reason the token was refused
/// before a refresh: a second refusal is then permanent.
async fn check_profile(app: &App, id: &str, refused_first: Option<&str>) -> ServiceResult<Checked> {
    let lock = connection_lock(id);
    let _guard = lock.lock().await;
    // Under the refresh lease, as a refresh runs: a check in one process that found the token
    // refused while another process's refresh replaced it would break a working connection
    // (the in-process lock keeps them apart within one process only).
    let owner = owner_id();
    let now = app.now_ms();
    let until = now + i64::try_from(app.config.jobs.lease_secs).unwrap_or(60) * 1000;
    if !db::connections::try_lease(&mut *app.db.writer().await?, id, owner, now, until).await? {
        // Not active (nothing to check), or busy in another process (a refresh or a check):
        // checked again in a few minutes.
        let mut conn = app.db.read().await?;
        let row = db::connections::get(&mut conn, id).await?.ok_or(ServiceError::NotFound("connection"))?;
        drop(conn);
        if ConnectionStatus::parse(&row.status) != ConnectionStatus::Active {
            return Ok(Checked::Done(Outcome::Current(Box::new(row))));
        }
        db::connections::set_next_check(&mut *app.db.writer().await?, id, now + BUSY_CHECK_DELAY_MS).await?;
        return Ok(Checked::Done(Outcome::Transient(
            "this connection is busy in another process (a refresh or a check); it is checked again in a few minutes"
                .into(),
        )));
    }
    // The check ends well within its lease (a check of TikTok may ask the provider four times),
    // so that it never writes a verdict once another process may have taken the connection.
    let within = Duration::from_millis(
        u64::try_from(until - now - start_margin_ms(app).min((until - now) / 4)).unwrap_or(0),
    );
    let checked = match tokio::time::timeout(within, check_profile_leased(app, id, refused_first)).await {
        Ok(checked) => checked,
        Err(_) => Ok(Checked::Done(Outcome::Transient(
            "the provider took too long to answer the health check's calls; it is checked again later".into(),
        ))),
    };
    let released = match app.db.writer().await {
        Ok(mut conn) => db::connections::release_claim(&mut conn, id, owner, until).await,
        Err(e) => Err(e),
    };
    if let Err(e) = released {
        // It runs out by itself.
        tracing::warn!(connection_id = %id, error = %e, "a health check's lease could not be given back");
    }
    checked
}

/// How long a health check waits when another process holds the connection (ms).
const BUSY_CHECK_DELAY_MS: i64 = 300_000;

/// [`check_profile`] under the lease.
async fn check_profile_leased(app: &App, id: &str, refused_first: Option<&str>) -> ServiceResult<Checked> {
    let mut conn = app.db.read().await?;
    let Some(mut row) = db::connections::get(&mut conn, id).await? else {
        return Err(ServiceError::NotFound("connection"));
    };
    drop(conn);
    if ConnectionStatus::parse(&row.status) != ConnectionStatus::Active {
        return Ok(Checked::Done(Outcome::Current(Box::new(row))));
    }
    let (platform, provider) = provider_of(app, &row)?;
    let Some(sealed) = row.access_token_sealed.as_deref() else {
        return Ok(Checked::Done(Outcome::Current(Box::new(row))));
    };
    let token = app.keys.open_str(sealed, access_aad(&row.workspace_id, &row.id))?;
    let result = provider.check_profile(&token, &connections::split_scopes(&row.scopes)).await;
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
            // Only the profile columns change here (and the scopes, if the provider withheld one
            // the grant held); tokens were not touched. Not over a connection repaired,
            // refreshed or disconnected while the provider was asked: the answer was about the
            // tokens it held before.
            let Some(mut current) = locked_if_unchanged(&mut tx, app, &row).await? else {
                drop(tx);
                let mut conn = app.db.read().await?;
                let now_row =
                    db::connections::get(&mut conn, id).await?.ok_or(ServiceError::NotFound("connection"))?;
                return Ok(Checked::Done(Outcome::Current(Box::new(now_row))));
            };
            current.username = row.username.clone();
            current.display_name = row.display_name.clone();
            current.avatar_url = row.avatar_url.clone();
            current.last_checked_at = row.last_checked_at;
            current.next_check_at = row.next_check_at;
            current.updated_at = now;
            let held = connections::split_scopes(&current.scopes);
            let left: Vec<String> =
                held.iter().filter(|s| !profile.withheld_scopes.contains(s)).cloned().collect();
            let change = ScopeChange::between(
                &current.scopes,
                &left,
                &app.config.providers.required_scopes(platform),
                provider.scopes(),
            );
            match change {
                Some(change) => {
                    if let Some(broken) =
                        store_scope_change(&mut tx, app, &mut current, &change, platform, now).await?
                    {
                        tx.commit().await?;
                        return Ok(Checked::Done(broken));
                    }
                }
                None => {
                    let indexed = Indexed { username: true, ..Indexed::NONE };
                    db::connections::update_changed(&mut tx, &current, indexed).await?;
                }
            }
            row = current;
            tx.commit().await?;
            Ok(Checked::Done(Outcome::Current(Box::new(row))))
        }
        Err(ProviderError::AccessTokenInvalid { reason }) if refused_first.is_none() => {
            tracing::info!(connection_id = %row.id, provider = %platform,
                "access token refused on a health check; refreshing once before judging the grant");
            Ok(Checked::AccessRefused { generation: row.token_generation, reason })
        }
        Err(
            ProviderError::Permanent { reason }
            | ProviderError::Scope { reason }
            | ProviderError::AccessTokenInvalid { reason },
        ) => {
            let name = platform.display_name();
            let why = match refused_first {
                Some(first) => format!(
                    "{name} rejected the access token on a health check ({first}), and the token a refresh then \
                     issued too ({reason}); the client must reconnect through the link."
                ),
                None => format!(
                    "{name} rejected the token on a health check ({reason}); the client must reconnect through the link."
                ),
            };
            let mut tx = app.db.begin_write().await?;
            let marked = connections::mark_broken_if_unchanged(&mut tx, app, &mut row, &why, now).await?;
            let outcome = refusal_outcome(&mut tx, marked, &row.id, why).await?;
            tx.commit().await?;
            Ok(Checked::Done(outcome))
        }
        // The account is no longer a professional one (switched in the Instagram app): the
        // professional API no longer serves it, whatever its token, until it is switched back
        // and connected again.
        // (Only a type Instagram names personal: an unknown one, which a new connection is refused
        // for, may be a type Instagram added, and is retried like any refusal.)
        Err(ProviderError::Rejected { reason })
            if crate::providers::instagram::names_personal_account(&reason) =>
        {
            tracing::info!(connection_id = %row.id, provider = %platform, "the account is no longer a professional one");
            let why = personal_account_reason(platform, "on a health check");
            let mut tx = app.db.begin_write().await?;
            let marked = connections::mark_broken_if_unchanged(&mut tx, app, &mut row, &why, now).await?;
            let outcome = refusal_outcome(&mut tx, marked, &row.id, why).await?;
            tx.commit().await?;
            Ok(Checked::Done(outcome))
        }
        Err(
            ProviderError::Transient { reason, .. }
            | ProviderError::Rejected { reason }
            | ProviderError::Misconfigured { reason },
        ) => {
            let mut conn = app.db.writer().await?;
            db::connections::set_next_check(&mut conn, &row.id, now + 3_600_000).await?;
            Ok(Checked::Done(Outcome::Transient(reason)))
        }
    }
}

/// Writes `row` after a refresh or a health check found its grant changed (`change`): the
/// smaller grant and its status reason, a `scopes_changed` history entry, and either the
/// connection broken (a required scope is gone: the outcome returned) or
/// `connection.scopes_changed`. `row` is the connection as read and locked in `tx`, with the
/// caller's changes (a health check's profile) applied.
async fn store_scope_change(
    tx: &mut sqlx::AnyConnection,
    app: &App,
    row: &mut ConnectionRow,
    change: &ScopeChange,
    platform: Platform,
    now: i64,
) -> ServiceResult<Option<Outcome>> {
    row.scopes.clone_from(&change.now);
    row.status_reason.clone_from(&change.note);
    row.updated_at = now;
    let detail = change.detail(platform);
    tracing::info!(connection_id = %row.id, provider = %platform, lost = ?change.lost, gained = ?change.gained, "granted scopes changed");
    db::connections::insert_event(tx, &connections::event(row, "scopes_changed", Some(detail.clone()), now))
        .await?;
    // (A health check may have read a new handle into the row.)
    let indexed = Indexed { username: true, ..Indexed::NONE };
    if !change.lost_required.is_empty() {
        db::connections::update_changed(tx, row, indexed).await?;
        let reason = change.broken_reason(platform);
        let marked = connections::mark_broken_if_unchanged(tx, app, row, &reason, now).await?;
        return Ok(Some(refusal_outcome(tx, marked, &row.id, reason).await?));
    }
    db::connections::update_changed(tx, row, indexed).await?;
    let data = connections::event_data(tx, app, row, Some(&detail)).await?;
    webhooks::emit(tx, app, now, &row.workspace_id, "connection.scopes_changed", data).await?;
    Ok(None)
}

/// Announces `connection.expiring` for grants that run out soon (once per grant).
pub async fn announce_expiring(app: &App) -> ServiceResult<usize> {
    let now = app.now_ms();
    let soon = now + i64::try_from(app.config.jobs.expiring_notice_secs).unwrap_or(0) * 1000;
    let mut conn = app.db.read().await?;
    let rows = db::connections::expiring(&mut conn, now, soon, 100).await?;
    drop(conn);
    let mut count = 0;
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
        // Once per grant, whichever process gets there first, and not for tokens replaced since
        // the row was read.
        if !db::connections::mark_expiring_notified(&mut tx, &row.id, row.token_generation, now).await? {
            continue;
        }
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
        count += 1;
    }
    Ok(count)
}

/// Gives back this process's claim on a connection's refresh, not started (shutting down).
pub async fn give_back(app: &App, claim: &Claim) -> ServiceResult<()> {
    db::connections::release_claim(&mut *app.db.writer().await?, &claim.id, owner_id(), claim.until).await?;
    Ok(())
}

/// A connection the scheduler claimed, and when its claim ends (ms).
#[derive(Debug, Clone)]
pub struct Claim {
    /// The connection.
    pub id: String,
    /// The end of the claim.
    pub until: i64,
}

/// Claims a batch of due refreshes for this process (the scheduler's query).
pub async fn claim_batch(app: &App) -> ServiceResult<Vec<Claim>> {
    let now = app.now_ms();
    let lease = i64::try_from(app.config.jobs.lease_secs).unwrap_or(60) * 1000;
    let until = now + lease;
    let mut tx = app.db.begin_write().await?;
    let ids = db::connections::claim_due_refreshes(
        &mut tx,
        app.db.backend(),
        owner_id(),
        now,
        until,
        i64::from(app.config.jobs.refresh_batch),
        app.providers.served(),
    )
    .await?;
    tx.commit().await?;
    Ok(ids.into_iter().map(|id| Claim { id, until }).collect())
}

/// The current time in database form (helper for callers without an `App` clock at hand).
pub fn now_ms(app: &App) -> i64 {
    to_millis(app.now())
}

/// Whether the in-process lock table holds an entry for `id`.
#[cfg(test)]
pub(crate) fn has_lock_entry(id: &str) -> bool {
    LOCKS.get().is_some_and(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(id))
}

#[cfg(test)]
mod tests {
    use super::ScopeChange;
    use crate::domain::Platform;

    /// A write that must not be lost is tried again while the database cannot be reached, backing
    /// off, for ten minutes; any other answer ends it at once.
    #[tokio::test(start_paused = true)]
    async fn a_write_is_tried_through_an_outage_only() {
        use crate::db::DbError;
        use crate::service::ServiceError;
        let start = tokio::time::Instant::now();
        let now_ms = move || i64::try_from(start.elapsed().as_millis()).unwrap();
        let unavailable = || ServiceError::Db(DbError::Unavailable("down".into()));
        // Down for three tries, then stored.
        let tries = std::cell::Cell::new(0);
        let stored = super::retry_while_unavailable(now_ms, "c", "test", || {
            tries.set(tries.get() + 1);
            let answer = if tries.get() <= 3 { Err(unavailable()) } else { Ok(7) };
            std::future::ready(answer)
        })
        .await;
        assert_eq!(stored.unwrap(), 7);
        assert_eq!(tries.get(), 4);
        assert_eq!(now_ms(), 200 + 400 + 800, "backing off");
        // Another failure: returned at once.
        let tries = std::cell::Cell::new(0);
        let refused = super::retry_while_unavailable(now_ms, "c", "test", || {
            tries.set(tries.get() + 1);
            std::future::ready(Err::<(), _>(ServiceError::Conflict("changed".into())))
        })
        .await;
        assert!(matches!(refused, Err(ServiceError::Conflict(_))));
        assert_eq!(tries.get(), 1);
        // Down for good: given up after ten minutes, no later.
        let from = now_ms();
        let given_up = super::retry_while_unavailable(now_ms, "c", "test", || {
            std::future::ready(Err::<(), _>(unavailable()))
        })
        .await;
        assert!(matches!(given_up, Err(ServiceError::Db(DbError::Unavailable(_)))));
        let waited = now_ms() - from;
        assert!((super::STORE_RETRY_MS - 5_000..=super::STORE_RETRY_MS).contains(&waited), "{waited}");
    }

    /// A claimed refresh starts only while its claim outlasts a whole provider call and the time
    /// to store the answer: ten seconds, or half of what a short lease leaves beyond the call.
    /// The configuration keeps the lease longer than the call, so a claim that is taken at once
    /// is always long enough to start.
    #[test]
    fn a_refresh_starts_only_with_time_to_store_its_answer() {
        // The defaults: a 10 s provider timeout and a 60 s lease.
        assert_eq!(super::start_margin(10, 60), 20_000);
        // A long lease keeps the ten seconds.
        assert_eq!(super::start_margin(30, 600), 40_000);
        // A short lease: half of what it leaves beyond the call.
        assert_eq!(super::start_margin(10, 15), 12_500);
        assert_eq!(super::start_margin(10, 11), 10_500);
        for (timeout, lease) in [(1, 2), (10, 11), (10, 60), (60, 61), (120, 86_400)] {
            let margin = super::start_margin(timeout, lease);
            let (call, lease) =
                (i64::try_from(timeout).unwrap() * 1000, i64::try_from(lease).unwrap() * 1000);
            assert!(margin > call && margin < lease, "{timeout} s, {lease} ms: {margin}");
        }
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn scope_changes_are_told_apart() {
        let requested = v(&["a", "b", "c"]);
        let required = v(&["a", "b"]);
        // Not reported (Instagram's refresh), or the same set in another order: no change.
        assert_eq!(ScopeChange::between("a,b,c", &[], &required, &requested), None);
        assert_eq!(ScopeChange::between("a,b,c", &v(&["c", "a", "b"]), &required, &requested), None);
        // An optional scope withdrawn.
        let c = ScopeChange::between("a,b,c", &v(&["a", "b"]), &required, &requested).unwrap();
        assert_eq!((c.now.as_str(), c.lost.clone(), c.lost_required.clone()), ("a,b", v(&["c"]), v(&[])));
        assert_eq!(c.note.as_deref(), Some("Granted without c."));
        assert_eq!(c.detail(Platform::Tiktok), "TikTok no longer grants c.");
        // A required one: only scopes granted before count as lost, so a scope the operator made
        // required later, which this grant never held, is not reported as withdrawn.
        let c = ScopeChange::between("a,c", &v(&["a"]), &v(&["a", "b", "c"]), &requested).unwrap();
        assert_eq!(c.lost_required, v(&["c"]));
        assert_eq!(c.note.as_deref(), Some("Granted without b, c."));
        // Given back: the note goes.
        let c = ScopeChange::between("a,b", &v(&["a", "b", "c"]), &required, &requested).unwrap();
        assert_eq!((c.gained.clone(), c.note.clone()), (v(&["c"]), None));
        assert_eq!(c.detail(Platform::Tiktok), "TikTok now also grants c.");
        let c = ScopeChange::between("a,b", &v(&["a", "c"]), &required, &requested).unwrap();
        assert_eq!(c.detail(Platform::Tiktok), "TikTok no longer grants b and now also grants c.");
    }
}
