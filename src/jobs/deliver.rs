//! Webhook delivery: at least once, signed per the Standard Webhooks specification, with
//! exponential backoff for about three days.
//!
//! - 2xx: delivered. 3xx is a failure (redirects are not followed).
//! - 410 Gone: the endpoint is disabled at once (with an audit entry).
//! - 429, 502, 503, 504 and others: retried; a `Retry-After` (seconds or an HTTP date, at most
//!   a day) is honoured.
//! - Every attempt is logged with its status code and latency.
//! - When a delivery has used up its retries, it is marked failed, and its endpoint is disabled
//!   with an audit entry unless it took another delivery since that one was made (an endpoint
//!   that refuses one event but takes the others keeps getting them). A manual redelivery starts
//!   a fresh retry schedule, so it never disables an endpoint by itself.
//!
//! Claims: a process claims only as many due deliveries as it can start at once, each for
//! `jobs.lease_secs` (at least twice what an attempt may take: the delivery timeout plus
//! [`MARGIN`]), and starts an attempt only while its claim has that much time left. An attempt is cut off at the
//! delivery timeout, so it ends within the claim; its result is written back only under the
//! claim it was made with. A claim that ran out anyway (a stalled process) and was taken over
//! by another process, or a manual redelivery made meanwhile, is not overwritten: the attempt is
//! still logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::db::webhooks::{AttemptRow, DeliveryRow};
use crate::db::{self, new_id};
use crate::service::webhooks::{RETRY_SCHEDULE_SECS, signature_header};
use crate::service::{Actor, ServiceResult, audit, refresh};
use crate::state::AppState;

/// Time allowed, beyond the delivery timeout, for reading a delivery before its attempt and
/// writing the result after it.
pub const MARGIN: Duration = Duration::from_secs(10);

/// One claimed delivery: the claim is named by this process's owner id and its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The delivery.
    pub id: String,
    /// Until when the claim holds (ms).
    pub until: i64,
}

/// The delivery loop.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.jobs.tick_ms);
    let limit = Arc::new(Semaphore::new(state.config.jobs.webhook_concurrency));
    let clients = Clients {
        guarded: state.webhook_guard.client(attempt_timeout(&state)),
        plain_http: state.webhook_guard.for_plain_http().client(attempt_timeout(&state)),
    };
    let mut in_flight = JoinSet::new();
    loop {
        let round = tokio::time::Instant::now();
        // Claim no more than can start now: a claimed delivery waiting for a slot would hold a
        // lease that runs out while it waits.
        let free = limit.available_permits().min(state.config.jobs.webhook_batch as usize);
        let claimed = if free > 0 { claim(&state, free).await } else { Vec::new() };
        let full = free > 0 && claimed.len() >= free;
        for c in claimed {
            // Only this loop takes permits, so the ones counted above are still free.
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                release(&state, &c).await;
                continue;
            };
            let state = state.clone();
            let clients = clients.clone();
            in_flight.spawn(async move {
                let _permit = permit;
                if let Err(e) = deliver_one(&state, &clients, &c).await {
                    tracing::warn!(delivery_id = %c.id, error = %e, "webhook delivery failed internally");
                }
            });
        }
        while in_flight.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        if full {
            continue;
        }
        // The next round at the next tick, or as soon as a delivery ends: its endpoint's next
        // one (held back by the limit of attempts in flight) need not wait a whole tick. At most
        // ten rounds a tick, though: each is a write transaction.
        let keep = if in_flight.is_empty() {
            super::tick(&mut stop, every).await
        } else {
            tokio::select! {
                _ = in_flight.join_next() => {
                    let gap = (every / 10).saturating_sub(round.elapsed());
                    if gap.is_zero() { !*stop.borrow() } else { super::tick(&mut stop, gap).await }
                }
                keep = super::tick(&mut stop, every) => keep,
            }
        };
        if !keep {
            break;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// The longest an attempt may take (`webhooks.timeout_secs`, at least a second).
fn attempt_timeout(state: &AppState) -> Duration {
    Duration::from_secs(state.config.webhooks.timeout_secs.max(1))
}

/// How long a claim lasts (ms): `jobs.lease_secs`, but never less than two attempts' worth of
/// time, so that an attempt started at once always ends within it.
fn lease_ms(state: &AppState) -> i64 {
    let configured = Duration::from_secs(state.config.jobs.lease_secs);
    let floor = (attempt_timeout(state) + MARGIN) * 2;
    i64::try_from(configured.max(floor).as_millis()).unwrap_or(i64::MAX / 2)
}

/// Whether a claim expiring at `until` leaves time for a whole attempt from `now`.
fn time_left_for_attempt(state: &AppState, until: i64, now: i64) -> bool {
    let needed = i64::try_from((attempt_timeout(state) + MARGIN).as_millis()).unwrap_or(i64::MAX / 2);
    until.saturating_sub(now) >= needed
}

async fn claim(state: &AppState, limit: usize) -> Vec<Claim> {
    let now = state.now_ms();
    let until = now.saturating_add(lease_ms(state));
    let claimed = async {
        let mut tx = state.db.begin_write().await?;
        let ids = db::webhooks::claim_due(
            &mut tx,
            state.db.backend(),
            refresh::owner_id(),
            now,
            until,
            i64::try_from(limit).unwrap_or(1),
        )
        .await?;
        tx.commit().await?;
        Ok::<_, crate::db::DbError>(ids)
    }
    .await;
    match claimed {
        Ok(ids) => ids.into_iter().map(|id| Claim { id, until }).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "claiming webhook deliveries failed");
            Vec::new()
        }
    }
}

/// Gives a claim back unused (the delivery stays due for the next round).
async fn release(state: &AppState, c: &Claim) {
    let released = async {
        let mut conn = state.db.writer().await?;
        db::webhooks::release_claim(&mut conn, &c.id, refresh::owner_id(), c.until).await
    }
    .await;
    if let Err(e) = released {
        tracing::warn!(delivery_id = %c.id, error = %e, "giving back a webhook delivery claim failed");
    }
}

/// The wait a response's `Retry-After` asks for, if it has a valid one.
fn retry_after(res: &reqwest::Response, now: OffsetDateTime) -> Option<Duration> {
    let value = res.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    crate::net::parse_retry_after(value, now)
}

/// The HTTP clients deliveries go through.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Through the webhook guard.
    pub guarded: reqwest::Client,
    /// Through the guard for plain http (see [`Guard::for_plain_http`](crate::net::Guard::for_plain_http)).
    pub plain_http: reqwest::Client,
}

/// Makes one attempt of one claimed delivery and records the result, if this process still
/// holds the claim.
pub async fn deliver_one(state: &AppState, clients: &Clients, claim: &Claim) -> ServiceResult<()> {
    let owner = refresh::owner_id();
    let mut conn = state.db.read().await?;
    let Some(mut d) = db::webhooks::get_delivery(&mut conn, &claim.id).await? else { return Ok(()) };
    if d.status != "pending" || d.lease_owner.as_deref() != Some(owner) || d.lease_until != Some(claim.until)
    {
        // Redelivered, cancelled or taken over since the claim: not ours to send.
        return Ok(());
    }
    let endpoint = db::webhooks::get_endpoint(&mut conn, &d.endpoint_id).await?;
    let event = db::webhooks::get_event(&mut conn, &d.event_id).await?;
    drop(conn);
    let (Some(endpoint), Some(event)) = (endpoint, event) else { return Ok(()) };
    let now = state.now_ms();
    if endpoint.enabled == 0 {
        d.status = "cancelled".into();
        d.updated_at = now;
        let mut conn = state.db.writer().await?;
        db::webhooks::finish_delivery(&mut conn, &d, owner, claim.until).await?;
        return Ok(());
    }
    if !time_left_for_attempt(state, claim.until, now) {
        // Too late to finish within the claim: give it back for the next round.
        release(state, claim).await;
        return Ok(());
    }

    // The receiver checks the signature's time against its own clock: always the wall clock,
    // even when the sandbox's control API has moved this process's clock (tests and demos).
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    // A payload or secret the configured keys cannot open is a refused attempt, counted like any
    // other (the delivery gives up in time); it used to fail before any attempt, and the
    // delivery was claimed again every lease, for ever, with no attempt logged.
    let prepared = state
        .keys
        .open_str(&event.payload, crate::service::webhooks::payload_aad(&event.workspace_id, &event.id))
        .map_err(crate::service::ServiceError::from)
        .and_then(|payload| {
            let body = secrecy::ExposeSecret::expose_secret(&payload).as_bytes().to_vec();
            let signature = signature_header(state, &endpoint, &event.id, timestamp, &body)?;
            Ok((body, signature))
        })
        .map_err(|e| {
            tracing::error!(delivery_id = %d.id, error = %e, "a webhook event or its endpoint's secret could not be opened");
            ("refused", "the event or the endpoint's signing secret could not be opened with the configured keys".to_string())
        });
    let started = Instant::now();
    let attempt = async {
        let (body, signature) = prepared?;
        let url = url::Url::parse(&endpoint.url).ok();
        // Plain http is admitted only to private targets allowed (on-premise receivers), and is
        // not sent to once they are no longer allowed: refused for its scheme before its address
        // is looked up when no private target is, else by its addresses.
        let plain = url.as_ref().is_some_and(|u| u.scheme() != "https");
        let not_https = || {
            (
                "refused",
                "the URL is not https, which only `webhooks.allow_private_targets` and, for a host in them, \
                 `webhooks.private_networks` admit; give the endpoint an https URL"
                    .to_string(),
            )
        };
        if plain && !state.webhook_guard.admits_any_private() {
            return Err(not_https());
        }
        // IP literals never reach the client's resolver, so check the host here too.
        let host = url.as_ref().and_then(|u| u.host_str().map(str::to_string));
        let Some(host) = host else { return Err(("refused", "the URL has no host".to_string())) };
        let addrs = state.webhook_guard.check_host(&host).await.map_err(|e| ("refused", e.to_string()))?;
        if plain && !state.webhook_guard.admits_plain_http(&addrs) {
            return Err(not_https());
        }
        // Plain http goes through a client whose resolver admits only the private targets.
        if plain { &clients.plain_http } else { &clients.guarded }
            .post(&endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", &signature)
            .body(body)
            .send()
            .await
            .map_err(|e| ("failed", crate::net::describe(&e)))
    };
    // The whole attempt, name resolution included, ends within the timeout (and so within the claim).
    let result = tokio::time::timeout(attempt_timeout(state), attempt)
        .await
        .unwrap_or_else(|_| Err(("failed", "timed out".to_string())));
    let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let now = state.now_ms();
    d.attempts += 1;
    d.updated_at = now;
    let (outcome, status_code, error, wait) = match result {
        Ok(res) => {
            let code = res.status().as_u16();
            if res.status().is_success() {
                ("succeeded", Some(i64::from(code)), None, None)
            } else {
                (
                    "failed",
                    Some(i64::from(code)),
                    Some(format!("HTTP {code}")),
                    retry_after(&res, state.now()),
                )
            }
        }
        Err((outcome, e)) => (outcome, None, Some(e), None),
    };
    d.last_status_code = status_code;
    d.last_error = error.clone();
    let gone = status_code == Some(410);
    let disable_for = settle(&mut d, outcome, gone, wait, now);
    let mut tx = state.db.begin_write().await?;
    let held = db::webhooks::finish_delivery(&mut tx, &d, owner, claim.until).await?;
    db::webhooks::insert_attempt(
        &mut tx,
        &AttemptRow {
            id: new_id(),
            delivery_id: d.id.clone(),
            attempted_at: now,
            status_code,
            latency_ms,
            outcome: outcome.into(),
            error: error.clone(),
        },
    )
    .await?;
    if let (true, Some(reason)) = (held, disable_for) {
        // A delivery that used up its retries disables its endpoint only if the endpoint took
        // nothing else meanwhile: one event it keeps refusing (a bug of the receiver's in one
        // event type) must not stop every other event. 410 Gone disables it at once.
        let working = !gone && db::webhooks::delivered_since(&mut tx, &endpoint.id, d.created_at).await?;
        if working {
            tracing::warn!(delivery_id = %d.id, endpoint_id = %endpoint.id,
                "a webhook delivery failed for good; its endpoint took other deliveries meanwhile and stays enabled");
        } else {
            disable(&mut tx, state, &endpoint, reason, now).await?;
        }
    }
    tx.commit().await?;
    if !held {
        tracing::warn!(
            delivery_id = %d.id,
            "a webhook delivery's claim was lost during its attempt; the attempt is logged, the delivery left as it is"
        );
    }
    let counted = match (outcome, d.status.as_str()) {
        ("succeeded", _) => "succeeded",
        (_, "failed") => "gave_up",
        _ => "failed",
    };
    metrics::counter!("authlink_webhook_deliveries_total", "outcome" => counted).increment(1);
    if outcome == "succeeded" {
        tracing::debug!(delivery_id = %d.id, status = ?status_code, latency_ms, "webhook delivered");
    } else {
        tracing::info!(delivery_id = %d.id, status = ?status_code, error = ?error, attempts = d.attempts, "webhook attempt failed");
    }
    Ok(())
}

/// Sets the delivery's state after an attempt (its `attempts` already counting it): delivered,
/// failed for good, or due again per the schedule (or later, if the receiver asked). Returns why
/// the endpoint must be disabled, if it must.
fn settle(
    d: &mut DeliveryRow,
    outcome: &str,
    gone: bool,
    wait: Option<Duration>,
    now: i64,
) -> Option<&'static str> {
    if outcome == "succeeded" {
        d.status = "succeeded".into();
        d.next_attempt_at = None;
        return None;
    }
    if gone {
        d.status = "failed".into();
        d.next_attempt_at = None;
        return Some("The endpoint answered 410 Gone.");
    }
    match usize::try_from(d.attempts - 1).ok().and_then(|i| RETRY_SCHEDULE_SECS.get(i)) {
        Some(delay) => {
            let jitter = rand::rng().random_range(0.9..1.1);
            let scheduled = (*delay as f64 * 1000.0 * jitter) as i64;
            let honoured = wait.map_or(0, |w| i64::try_from(w.as_millis()).unwrap_or(0));
            d.next_attempt_at = Some(now + scheduled.max(honoured));
            None
        }
        None => {
            d.status = "failed".into();
            d.next_attempt_at = None;
            Some("Deliveries kept failing for about three days.")
        }
    }
}

/// Disables an endpoint because of its deliveries: only its enabled flag and reason change
/// (never what was changed while the attempt was in flight), then its pending deliveries are
/// cancelled, the change audited, and the workspace's other endpoints told
/// (`webhook.endpoint_disabled`). Nothing happens if it was disabled meanwhile, or moved to
/// another URL (whose deliveries have not failed).
async fn disable(
    tx: &mut sqlx::AnyConnection,
    app: &AppState,
    endpoint: &db::webhooks::EndpointRow,
    reason: &str,
    now: i64,
) -> ServiceResult<()> {
    if !db::webhooks::disable_endpoint(tx, &endpoint.id, &endpoint.url, reason, now).await? {
        return Ok(());
    }
    db::webhooks::cancel_pending(tx, &endpoint.id, now).await?;
    audit::record(
        tx,
        now,
        &Actor::System,
        Some(&endpoint.workspace_id),
        "webhook.disabled",
        "webhook_endpoint",
        &endpoint.id,
        serde_json::json!({"reason": reason}),
    )
    .await?;
    // The endpoint is disabled by now, so the event goes to the others only. They may belong to
    // other parties (a chat tool, an automation service), and receivers often put a token in
    // their URL's path or query: the URL is named by its origin alone.
    let origin = url::Url::parse(&endpoint.url).map(|u| u.origin().ascii_serialization()).unwrap_or_default();
    let data = serde_json::json!({"endpoint_id": endpoint.id, "origin": origin, "reason": reason});
    crate::service::webhooks::emit(
        &mut *tx,
        app,
        now,
        &endpoint.workspace_id,
        "webhook.endpoint_disabled",
        data,
    )
    .await?;
    tracing::warn!(endpoint_id = %endpoint.id, reason, "webhook endpoint disabled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(attempts: i64) -> DeliveryRow {
        DeliveryRow {
            id: "d".into(),
            event_id: "msg_1".into(),
            endpoint_id: "e".into(),
            workspace_id: "w".into(),
            status: "pending".into(),
            attempts,
            next_attempt_at: Some(0),
            lease_owner: None,
            lease_until: None,
            last_status_code: None,
            last_error: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn schedule_after_a_failed_attempt() {
        // The first failure is retried after about 5 s, or later when the receiver asks.
        let mut d = pending(1);
        assert_eq!(settle(&mut d, "failed", false, None, 1_000), None);
        let next = d.next_attempt_at.unwrap();
        assert!((1_000 + 4_500..=1_000 + 5_500).contains(&next), "{next}");
        let mut d = pending(1);
        settle(&mut d, "failed", false, Some(Duration::from_secs(3600)), 1_000);
        assert_eq!(d.next_attempt_at, Some(1_000 + 3_600_000));
        // The last slot used up: failed for good, and the endpoint is to be disabled.
        let mut d = pending(i64::try_from(RETRY_SCHEDULE_SECS.len()).unwrap() + 1);
        assert!(settle(&mut d, "failed", false, None, 1_000).is_some());
        assert_eq!(d.status, "failed");
        // 410: at once.
        let mut d = pending(1);
        assert!(settle(&mut d, "failed", true, None, 1_000).unwrap().contains("410"));
    }
}
