//! Webhook delivery: at least once, signed per the Standard Webhooks specification, with
//! exponential backoff for about three days.
//!
//! - 2xx: delivered. 3xx is a failure (redirects are not followed).
//! - 410 Gone: the endpoint is disabled at once (with an audit entry).
//! - 429, 502, 503, 504 and others: retried; a `Retry-After` (seconds or an HTTP date, at most
//!   a day) is honoured.
//! - Every attempt is logged with its status code and latency.
//! - When a delivery has used up its retries, it is marked failed and its endpoint, which has
//!   then failed for about three days, is disabled with an audit entry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::db::webhooks::AttemptRow;
use crate::db::{self, new_id};
use crate::service::webhooks::{RETRY_SCHEDULE_SECS, signature_header};
use crate::service::{Actor, ServiceResult, audit, refresh};
use crate::state::AppState;

/// The delivery loop.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.jobs.tick_ms);
    let limit = Arc::new(Semaphore::new(state.config.jobs.webhook_concurrency));
    let client = state.webhook_guard.client(Duration::from_secs(state.config.webhooks.timeout_secs.max(1)));
    let mut in_flight = JoinSet::new();
    loop {
        let claimed = if limit.available_permits() > 0 { claim(&state).await } else { Vec::new() };
        let full = claimed.len() >= state.config.jobs.webhook_batch as usize;
        for id in claimed {
            let Ok(permit) = limit.clone().acquire_owned().await else { break };
            let state = state.clone();
            let client = client.clone();
            in_flight.spawn(async move {
                let _permit = permit;
                if let Err(e) = deliver_one(&state, &client, &id).await {
                    tracing::warn!(delivery_id = %id, error = %e, "webhook delivery failed internally");
                }
            });
        }
        while in_flight.try_join_next().is_some() {}
        if full && !*stop.borrow() {
            continue;
        }
        if !super::tick(&mut stop, every).await {
            break;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

async fn claim(state: &AppState) -> Vec<String> {
    let now = state.now_ms();
    let lease = i64::try_from(state.config.jobs.lease_secs).unwrap_or(60) * 1000;
    let claimed = async {
        let mut tx = state.db.begin_write().await?;
        let ids = db::webhooks::claim_due(
            &mut tx,
            state.db.backend(),
            refresh::owner_id(),
            now,
            now + lease,
            i64::from(state.config.jobs.webhook_batch),
        )
        .await?;
        tx.commit().await?;
        Ok::<_, crate::db::DbError>(ids)
    }
    .await;
    claimed.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "claiming webhook deliveries failed");
        Vec::new()
    })
}

/// The longest wait a `Retry-After` can ask for.
const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// The wait a response's `Retry-After` asks for, if it has a valid one.
fn retry_after(res: &reqwest::Response, now: OffsetDateTime) -> Option<Duration> {
    let value = res.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, now)
}

/// A `Retry-After` value (RFC 9110 §10.2.3) as a wait from `now`: delay-seconds, or an
/// HTTP-date in any of its three forms; a date in the past means no wait. At most a day.
fn parse_retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    let secs = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time".
        value.parse::<u64>().unwrap_or(u64::MAX)
    } else {
        u64::try_from((http_date(value)? - now).whole_seconds()).unwrap_or(0)
    };
    Some(Duration::from_secs(secs.min(MAX_RETRY_AFTER_SECS)))
}

/// Parses an HTTP-date: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or one of the obsolete
/// forms recipients must still accept, RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
/// (`Sun Nov  6 08:49:37 1994`).
fn http_date(value: &str) -> Option<OffsetDateTime> {
    // IMF-fixdate is an RFC 2822 date in GMT.
    if let Ok(at) = OffsetDateTime::parse(value, &Rfc2822) {
        return Some(at);
    }
    // The obsolete forms, rewritten as RFC 2822 (whose two-digit years are 19xx from 50 on).
    // The weekday is redundant with the date and dropped.
    let rewritten = match value.split_once(", ") {
        Some((_, rest)) => {
            let (date, clock) = rest.split_once(' ')?;
            if date.matches('-').count() != 2 {
                return None;
            }
            format!("{} {clock}", date.replace('-', " "))
        }
        None => match value.split_whitespace().collect::<Vec<_>>().as_slice() {
            [_, month, day, clock, year] => format!("{day} {month} {year} {clock} GMT"),
            _ => return None,
        },
    };
    OffsetDateTime::parse(&rewritten, &Rfc2822).ok()
}

/// Makes one attempt of one claimed delivery and records the result.
pub async fn deliver_one(state: &AppState, client: &reqwest::Client, id: &str) -> ServiceResult<()> {
    let mut conn = state.db.read().await?;
    let Some(mut d) = db::webhooks::get_delivery(&mut conn, id).await? else { return Ok(()) };
    if d.status != "pending" {
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
        db::webhooks::update_delivery(&mut conn, &d).await?;
        return Ok(());
    }

    let timestamp = now / 1000;
    let payload = state.keys.open_str(&event.payload, crate::service::webhooks::payload_aad(&event.id))?;
    let body = secrecy::ExposeSecret::expose_secret(&payload).as_bytes().to_vec();
    let signature = signature_header(state, &endpoint, &event.id, timestamp, &body)?;
    let started = Instant::now();
    // IP literals never reach the client's resolver, so check the host here too.
    let host_ok = match url::Url::parse(&endpoint.url).ok().and_then(|u| u.host_str().map(str::to_string)) {
        Some(host) => state.webhook_guard.check_host(&host).await.map(|_| ()).map_err(|e| e.to_string()),
        None => Err("the URL has no host".to_string()),
    };
    let result = match host_ok {
        Err(e) => Err(("refused", e)),
        Ok(()) => client
            .post(&endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", &signature)
            .body(body)
            .send()
            .await
            .map_err(|e| ("failed", describe(&e))),
    };
    let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let now = state.now_ms();
    d.attempts += 1;
    d.updated_at = now;
    let (outcome, status_code, error, wait) = match result {
        Ok(res) => {
            let code = res.status().as_u16();
            let wait = retry_after(&res, state.now());
            if res.status().is_success() {
                ("succeeded", Some(i64::from(code)), None, None)
            } else {
                ("failed", Some(i64::from(code)), Some(format!("HTTP {code}")), wait)
            }
        }
        Err((outcome, e)) => (outcome, None, Some(e), None),
    };
    let mut tx = state.db.begin_write().await?;
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
    d.last_status_code = status_code;
    d.last_error = error.clone();
    if outcome == "succeeded" {
        d.status = "succeeded".into();
        d.next_attempt_at = None;
    } else if status_code == Some(410) {
        d.status = "failed".into();
        d.next_attempt_at = None;
        disable(&mut tx, &endpoint, "The endpoint answered 410 Gone.", now).await?;
    } else if let Some(delay) = usize::try_from(d.attempts - 1).ok().and_then(|i| RETRY_SCHEDULE_SECS.get(i))
    {
        let jitter = rand::rng().random_range(0.9..1.1);
        let scheduled = (*delay as f64 * 1000.0 * jitter) as i64;
        let honoured = wait.map_or(0, |w| i64::try_from(w.as_millis()).unwrap_or(0));
        d.next_attempt_at = Some(now + scheduled.max(honoured));
    } else {
        d.status = "failed".into();
        d.next_attempt_at = None;
        disable(&mut tx, &endpoint, "Deliveries kept failing for about three days.", now).await?;
    }
    db::webhooks::update_delivery(&mut tx, &d).await?;
    tx.commit().await?;
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

/// Disables an endpoint because of its deliveries: only its enabled flag and reason change
/// (never what was changed while the attempt was in flight), then its pending deliveries are
/// cancelled and the change audited. Nothing happens if it was disabled meanwhile, or moved to
/// another URL (whose deliveries have not failed).
async fn disable(
    tx: &mut sqlx::AnyConnection,
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
    tracing::warn!(endpoint_id = %endpoint.id, reason, "webhook endpoint disabled");
    Ok(())
}

/// A delivery error in words, without the URL (which may carry credentials in its query).
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if text.contains("private") || text.contains("resolve") {
            out = format!("{out}: {text}");
            break;
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2025-03-01 12:00:00 UTC);

    fn wait(value: &str) -> Option<u64> {
        parse_retry_after(value, NOW).map(|d| d.as_secs())
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(wait("120"), Some(120));
        assert_eq!(wait(" 0 "), Some(0));
        // Bounded to a day, however large.
        assert_eq!(wait("604800"), Some(86_400));
        assert_eq!(wait("99999999999999999999999999"), Some(86_400));
        for bad in ["", "-5", "1.5", "soon", "12 s"] {
            assert_eq!(wait(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // IMF-fixdate, the form senders use.
        assert_eq!(wait("Sat, 01 Mar 2025 12:02:00 GMT"), Some(120));
        assert_eq!(wait("Sat, 01 Mar 2025 14:00:00 GMT"), Some(7200));
        // The obsolete forms: RFC 850 and asctime.
        assert_eq!(wait("Saturday, 01-Mar-25 12:00:30 GMT"), Some(30));
        assert_eq!(wait("Sat Mar  1 12:10:00 2025"), Some(600));
        // A date in the past: no wait. Far ahead: a day at most.
        assert_eq!(wait("Sun, 06 Nov 1994 08:49:37 GMT"), Some(0));
        assert_eq!(wait("Mon, 01 Mar 2027 12:00:00 GMT"), Some(86_400));
        for bad in [
            "Sat, 32 Mar 2025 12:00:00 GMT",
            "Sat, 01 Mar 2025 25:00:00 GMT",
            "Saturday, 01 Mar 25 12:00:30 GMT",
            "Sat Mar 1 12:10:00",
            "tomorrow",
            "Sat, 01 Mar",
        ] {
            assert_eq!(wait(bad), None, "{bad:?}");
        }
    }
}
