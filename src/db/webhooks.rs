//! Webhook endpoints, the event outbox, deliveries and the log of delivery attempts.

use std::sync::LazyLock;

use sqlx::AnyConnection;

use super::stmt::{Exec, from_lite, stmt};
use super::{Backend, DbResult};

/// An endpoint as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndpointRow {
    /// Id.
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// Where events are POSTed.
    pub url: String,
    /// The signing secret (`whsec_...`), sealed for `webhook_endpoints/<id>/secret`.
    pub secret_sealed: String,
    /// The previous secret during a rotation, sealed for `webhook_endpoints/<id>/previous_secret`.
    pub previous_secret_sealed: Option<String>,
    /// Until when the previous secret also signs (ms).
    pub previous_secret_until: Option<i64>,
    /// Comma-separated event types, or `*`.
    pub events: String,
    /// 1 when deliveries are made.
    pub enabled: i64,
    /// Why it was disabled.
    pub disabled_reason: Option<String>,
    /// A note.
    pub description: Option<String>,
    /// Creation (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

impl EndpointRow {
    /// The `events` value of a removed endpoint: its row stays (its deliveries reference it),
    /// disabled for good and hidden from every listing and lookup but those of delivery logs.
    pub const REMOVED: &'static str = "removed";

    /// Whether the endpoint was removed.
    pub fn is_removed(&self) -> bool {
        self.events == Self::REMOVED
    }

    /// Whether the endpoint wants `event_type`.
    pub fn wants(&self, event_type: &str) -> bool {
        self.events == "*" || self.events.split(',').any(|e| e == event_type)
    }
}

from_lite!(EndpointRow {
    id,
    workspace_id,
    url,
    secret_sealed,
    previous_secret_sealed,
    previous_secret_until,
    events,
    enabled,
    disabled_reason,
    description,
    created_at,
    updated_at
});

const ENDPOINT_COLUMNS: &str = "id, workspace_id, url, secret_sealed, previous_secret_sealed, previous_secret_until, \
    events, enabled, disabled_reason, description, created_at, updated_at";

/// Inserts an endpoint.
pub async fn insert_endpoint(conn: &mut AnyConnection, e: &EndpointRow) -> DbResult<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    )))
    .bind(&e.id)
    .bind(&e.workspace_id)
    .bind(&e.url)
    .bind(&e.secret_sealed)
    .bind(&e.previous_secret_sealed)
    .bind(e.previous_secret_until)
    .bind(&e.events)
    .bind(e.enabled)
    .bind(&e.disabled_reason)
    .bind(&e.description)
    .bind(e.created_at)
    .bind(e.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes every mutable column.
pub async fn update_endpoint(conn: &mut AnyConnection, e: &EndpointRow) -> DbResult<()> {
    sqlx::query(
        "UPDATE webhook_endpoints SET url = $2, secret_sealed = $3, previous_secret_sealed = $4, \
         previous_secret_until = $5, events = $6, enabled = $7, disabled_reason = $8, description = $9, updated_at = $10 \
         WHERE id = $1",
    )
    .bind(&e.id)
    .bind(&e.url)
    .bind(&e.secret_sealed)
    .bind(&e.previous_secret_sealed)
    .bind(e.previous_secret_until)
    .bind(&e.events)
    .bind(e.enabled)
    .bind(&e.disabled_reason)
    .bind(&e.description)
    .bind(e.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Disables an endpoint because of its deliveries, touching only `enabled`, `disabled_reason`
/// and `updated_at`, so that changes made while an attempt was in flight (a secret rotation, a
/// new note) stay. Only an enabled endpoint still at `url` (the address that failed) is
/// disabled: one already disabled keeps its reason, and one moved to another URL meanwhile is
/// left alone. Returns whether it was disabled.
pub async fn disable_endpoint(
    conn: &mut AnyConnection,
    id: &str,
    url: &str,
    reason: &str,
    now_ms: i64,
) -> DbResult<bool> {
    let done = sqlx::query(
        "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = $3, updated_at = $4 \
         WHERE id = $1 AND url = $2 AND enabled <> 0",
    )
    .bind(id)
    .bind(url)
    .bind(reason)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One endpoint.
pub async fn get_endpoint(conn: &mut AnyConnection, id: &str) -> DbResult<Option<EndpointRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// [`get_endpoint`] in a write transaction that will change the endpoint: locked until the
/// transaction ends on PostgreSQL (SQLite's write transactions already are exclusive), so that
/// two changes made at once apply one after the other instead of one undoing the other.
pub async fn get_endpoint_for_update(
    conn: &mut AnyConnection,
    backend: super::Backend,
    id: &str,
) -> DbResult<Option<EndpointRow>> {
    let lock = if backend == super::Backend::Postgres { " FOR UPDATE" } else { "" };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1{lock}"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Deletes up to `batch` deliveries finished (delivered, given up or cancelled) before
/// `before_ms`, with their attempts, then up to `batch` events made before it that have no
/// delivery left; run it in a transaction. Returns how many deliveries and events went.
pub async fn purge_finished(conn: &mut AnyConnection, before_ms: i64, batch: i64) -> DbResult<(u64, u64)> {
    // The deliveries are chosen once, and on PostgreSQL locked: a redelivery of one of them
    // (which makes it pending again) either came first, and it is not chosen, or waits for
    // this; the attempts and the deliveries deleted are the same ones.
    let lock = if conn.backend_name().eq_ignore_ascii_case("sqlite") { "" } else { " FOR UPDATE" };
    let ids: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM webhook_deliveries WHERE status IN ('succeeded', 'failed', 'cancelled') \
         AND updated_at < $1 ORDER BY id LIMIT $2{lock}"
    )))
    .bind(before_ms)
    .bind(batch)
    .fetch_all(&mut *conn)
    .await?;
    let mut deliveries = 0;
    for chunk in ids.chunks(500) {
        let list = (1..=chunk.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        for table_key in ["webhook_attempts WHERE delivery_id", "webhook_deliveries WHERE id"] {
            let sql = format!("DELETE FROM {table_key} IN ({list})");
            let query = chunk.iter().fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, (id,)| q.bind(id));
            let done = query.execute(&mut *conn).await?.rows_affected();
            if table_key.starts_with("webhook_deliveries") {
                deliveries += done;
            }
        }
    }
    let events = sqlx::query(
        "DELETE FROM webhook_events WHERE id IN (SELECT e.id FROM webhook_events e WHERE e.created_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id) ORDER BY e.id LIMIT $2)",
    )
    .bind(before_ms)
    .bind(batch)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok((deliveries, events))
}

/// Deletes up to `batch` removed endpoints last changed before `before_ms` that no delivery
/// refers to any more (their deliveries purged): their URL, which may hold a receiver's token,
/// is kept no longer than their delivery log. Returns how many.
pub async fn purge_removed_endpoints(conn: &mut AnyConnection, before_ms: i64, batch: i64) -> DbResult<u64> {
    let done = sqlx::query(
        "DELETE FROM webhook_endpoints WHERE id IN (SELECT e.id FROM webhook_endpoints e WHERE e.events = $1 \
         AND e.updated_at < $2 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.endpoint_id = e.id) \
         ORDER BY e.id LIMIT $3)",
    )
    .bind(EndpointRow::REMOVED)
    .bind(before_ms)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Forgets the secrets that stopped signing before `now_ms` (the one before a rotation, kept a
/// day). Returns how many endpoints had one.
pub async fn forget_previous_secrets(conn: &mut AnyConnection, now_ms: i64) -> DbResult<u64> {
    let done = sqlx::query(
        "UPDATE webhook_endpoints SET previous_secret_sealed = NULL, previous_secret_until = NULL \
         WHERE previous_secret_until < $1",
    )
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Whether a delivery to the endpoint succeeded at or after `since_ms`.
pub async fn delivered_since(conn: &mut AnyConnection, endpoint_id: &str, since_ms: i64) -> DbResult<bool> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM (SELECT 1 FROM webhook_deliveries WHERE endpoint_id = $1 AND status = 'succeeded' \
         AND updated_at >= $2 LIMIT 1) AS s",
    )
    .bind(endpoint_id)
    .bind(since_ms)
    .fetch_one(conn)
    .await?;
    Ok(n > 0)
}

/// How many endpoints of a workspace are not removed.
pub async fn count_live_endpoints(conn: &mut AnyConnection, workspace_id: &str) -> DbResult<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM webhook_endpoints WHERE workspace_id = $1 AND events <> $2")
            .bind(workspace_id)
            .bind(EndpointRow::REMOVED)
            .fetch_one(conn)
            .await?;
    Ok(n)
}

/// The endpoints of a workspace (every workspace with `None`), oldest first.
pub async fn list_endpoints(conn: &mut impl Exec, workspace_id: Option<&str>) -> DbResult<Vec<EndpointRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE ($1 IS NULL OR workspace_id = $1) ORDER BY id"
        )
    });
    conn.fetch_all(&stmt!(&SQL, workspace_id)).await
}

/// Removes an endpoint: its pending deliveries are cancelled, its history stays until the
/// endpoint row goes (deliveries reference it, so the row is kept disabled and marked removed).
pub async fn cancel_pending(conn: &mut AnyConnection, endpoint_id: &str, now_ms: i64) -> DbResult<u64> {
    let done = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'cancelled', lease_owner = NULL, lease_until = NULL, updated_at = $2 \
         WHERE endpoint_id = $1 AND status = 'pending'",
    )
    .bind(endpoint_id)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// An outbox event as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// `msg_<uuid>`: the `webhook-id`, stable across retries.
    pub id: String,
    /// Workspace.
    pub workspace_id: String,
    /// e.g. `connection.broken`.
    pub event_type: String,
    /// The JSON body sent.
    pub payload: String,
    /// When (ms).
    pub created_at: i64,
}

/// Inserts an event.
pub async fn insert_event(conn: &mut impl Exec, e: &EventRow) -> DbResult<()> {
    const SQL: &str = "INSERT INTO webhook_events (id, workspace_id, event_type, payload, created_at) VALUES ($1, $2, $3, $4, $5)";
    conn.execute(&stmt!(SQL, &e.id, &e.workspace_id, &e.event_type, &e.payload, e.created_at)).await?;
    Ok(())
}

/// One event.
pub async fn get_event(conn: &mut AnyConnection, id: &str) -> DbResult<Option<EventRow>> {
    Ok(sqlx::query_as(
        "SELECT id, workspace_id, event_type, payload, created_at FROM webhook_events WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// A delivery as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    /// Id.
    pub id: String,
    /// The event.
    pub event_id: String,
    /// The endpoint.
    pub endpoint_id: String,
    /// Workspace.
    pub workspace_id: String,
    /// `pending`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due (ms).
    pub next_attempt_at: Option<i64>,
    /// The process holding the claim.
    pub lease_owner: Option<String>,
    /// Until when (ms).
    pub lease_until: Option<i64>,
    /// The last HTTP status received.
    pub last_status_code: Option<i64>,
    /// The last error.
    pub last_error: Option<String>,
    /// Creation (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

const DELIVERY_COLUMNS: &str = "id, event_id, endpoint_id, workspace_id, status, attempts, next_attempt_at, lease_owner, \
    lease_until, last_status_code, last_error, created_at, updated_at";

/// Inserts a delivery.
pub async fn insert_delivery(conn: &mut impl Exec, d: &DeliveryRow) -> DbResult<()> {
    const SQL: &str = "INSERT INTO webhook_deliveries (id, event_id, endpoint_id, workspace_id, status, attempts, \
        next_attempt_at, lease_owner, lease_until, last_status_code, last_error, created_at, updated_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";
    let s = stmt!(
        SQL,
        &d.id,
        &d.event_id,
        &d.endpoint_id,
        &d.workspace_id,
        &d.status,
        d.attempts,
        d.next_attempt_at,
        &d.lease_owner,
        d.lease_until,
        d.last_status_code,
        &d.last_error,
        d.created_at,
        d.updated_at,
    );
    conn.execute(&s).await?;
    Ok(())
}

/// Writes the outcome of an attempt and releases the claim, but only if the claim is still the
/// one `owner` took until `lease_until` (and the delivery still pending): a claim that ran out
/// and was taken by another process, or a manual redelivery meanwhile, wins. Returns whether the
/// row was written.
pub async fn finish_delivery(
    conn: &mut AnyConnection,
    d: &DeliveryRow,
    owner: &str,
    lease_until: i64,
) -> DbResult<bool> {
    let done = sqlx::query(
        "UPDATE webhook_deliveries SET status = $2, attempts = $3, next_attempt_at = $4, lease_owner = NULL, \
         lease_until = NULL, last_status_code = $5, last_error = $6, updated_at = $7 \
         WHERE id = $1 AND status = 'pending' AND lease_owner = $8 AND lease_until = $9",
    )
    .bind(&d.id)
    .bind(&d.status)
    .bind(d.attempts)
    .bind(d.next_attempt_at)
    .bind(d.last_status_code)
    .bind(&d.last_error)
    .bind(d.updated_at)
    .bind(owner)
    .bind(lease_until)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives back a claim without an attempt (it stays due), if `owner` still holds it.
pub async fn release_claim(
    conn: &mut AnyConnection,
    id: &str,
    owner: &str,
    lease_until: i64,
) -> DbResult<()> {
    sqlx::query(
        "UPDATE webhook_deliveries SET lease_owner = NULL, lease_until = NULL \
         WHERE id = $1 AND lease_owner = $2 AND lease_until = $3",
    )
    .bind(id)
    .bind(owner)
    .bind(lease_until)
    .execute(conn)
    .await?;
    Ok(())
}

/// Makes a delivery due now with a fresh attempt sequence (manual redelivery): pending, no
/// attempts counted. Its attempt log stays. Not while an attempt of it is running (claimed and
/// the claim not run out): returns whether it was restarted.
pub async fn restart_delivery(conn: &mut AnyConnection, id: &str, now_ms: i64) -> DbResult<bool> {
    let done = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, lease_owner = NULL, \
         lease_until = NULL, updated_at = $2 WHERE id = $1 AND (status <> 'pending' OR lease_until IS NULL OR lease_until < $2)",
    )
    .bind(id)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One delivery.
pub async fn get_delivery(conn: &mut AnyConnection, id: &str) -> DbResult<Option<DeliveryRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The deliveries of an endpoint, newest first.
pub async fn list_deliveries(
    conn: &mut AnyConnection,
    endpoint_id: &str,
    before: Option<&str>,
    limit: i64,
) -> DbResult<Vec<DeliveryRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 AND ($2 IS NULL OR id < $2) \
         ORDER BY id DESC LIMIT $3"
    )))
    .bind(endpoint_id)
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Most deliveries to one endpoint in flight at once, across every process: an endpoint that
/// hangs (each attempt waits for the whole timeout) then holds this many delivery slots, and the
/// other endpoints' deliveries go on.
pub const MAX_IN_FLIGHT_PER_ENDPOINT: usize = 2;

/// Most deliveries of one workspace in flight at once, across every process: a workspace whose
/// endpoints all hang (or whose backlog is large) then holds at most this many delivery slots,
/// and other workspaces' deliveries go on beside them.
pub const MAX_IN_FLIGHT_PER_WORKSPACE: usize = 4;

/// Claims at most `limit` due deliveries for `owner` until `until_ms`, oldest due first, no more
/// than [`MAX_IN_FLIGHT_PER_ENDPOINT`] per endpoint and [`MAX_IN_FLIGHT_PER_WORKSPACE`] per
/// workspace, counting those already in flight. The caller
/// runs it in a write transaction: candidates are read, picked, then claimed by a conditional
/// update (a delivery another process claimed meanwhile is not taken; on SQLite, writers run
/// one at a time anyway). `owner` and `until_ms` together name the claim: [`finish_delivery`]
/// writes back only under it.
pub async fn claim_due(
    conn: &mut AnyConnection,
    backend: Backend,
    owner: &str,
    now_ms: i64,
    until_ms: i64,
    limit: i64,
) -> DbResult<Vec<String>> {
    // Claim rounds one at a time across processes, so that the count of deliveries in flight
    // per endpoint read below stays true until this round's claims commit.
    super::advisory_lock(conn, backend, "webhook claims").await?;
    // Endpoints and workspaces already at their limit are left out here, and each endpoint and
    // workspace offers no more due deliveries than its limit (its oldest), so that one backlog
    // does not fill the candidates and keep the others' deliveries waiting behind it.
    let candidates: Vec<(String, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, endpoint_id, workspace_id FROM ( \
           SELECT id, endpoint_id, workspace_id, next_attempt_at, \
             ROW_NUMBER() OVER (PARTITION BY workspace_id ORDER BY next_attempt_at, id) AS in_workspace FROM ( \
               SELECT id, endpoint_id, workspace_id, next_attempt_at, \
                 ROW_NUMBER() OVER (PARTITION BY endpoint_id ORDER BY next_attempt_at, id) AS in_endpoint \
               FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $1 \
               AND (lease_until IS NULL OR lease_until < $1)) due \
             WHERE in_endpoint <= {MAX_IN_FLIGHT_PER_ENDPOINT}) capped \
         WHERE in_workspace <= {MAX_IN_FLIGHT_PER_WORKSPACE} AND endpoint_id NOT IN \
           (SELECT endpoint_id FROM webhook_deliveries WHERE status = 'pending' AND lease_until >= $1 \
            GROUP BY endpoint_id HAVING COUNT(*) >= {MAX_IN_FLIGHT_PER_ENDPOINT}) \
         AND workspace_id NOT IN \
           (SELECT workspace_id FROM webhook_deliveries WHERE status = 'pending' AND lease_until >= $1 \
            GROUP BY workspace_id HAVING COUNT(*) >= {MAX_IN_FLIGHT_PER_WORKSPACE}) \
         ORDER BY next_attempt_at, id LIMIT $2"
    )))
    .bind(now_ms)
    .bind(limit.saturating_mul(4))
    .fetch_all(&mut *conn)
    .await?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let in_flight: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT endpoint_id, workspace_id, COUNT(*) FROM webhook_deliveries WHERE status = 'pending' \
         AND lease_until >= $1 GROUP BY endpoint_id, workspace_id",
    )
    .bind(now_ms)
    .fetch_all(&mut *conn)
    .await?;
    let mut per_endpoint = std::collections::HashMap::<String, usize>::new();
    let mut per_workspace = std::collections::HashMap::<String, usize>::new();
    for (endpoint, workspace, n) in in_flight {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        *per_endpoint.entry(endpoint).or_default() += n;
        *per_workspace.entry(workspace).or_default() += n;
    }
    let mut picked = Vec::new();
    for (id, endpoint, workspace) in candidates {
        if picked.len() as i64 >= limit {
            break;
        }
        let e = per_endpoint.entry(endpoint).or_default();
        let w = per_workspace.entry(workspace).or_default();
        if *e < MAX_IN_FLIGHT_PER_ENDPOINT && *w < MAX_IN_FLIGHT_PER_WORKSPACE {
            *e += 1;
            *w += 1;
            picked.push(id);
        }
    }
    if picked.is_empty() {
        return Ok(Vec::new());
    }
    let list = (0..picked.len()).map(|i| format!("${}", i + 4)).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "UPDATE webhook_deliveries SET lease_owner = $1, lease_until = $2 WHERE id IN ({list}) \
         AND status = 'pending' AND (lease_until IS NULL OR lease_until < $3) RETURNING id"
    );
    let mut q =
        sqlx::query_as::<_, (String,)>(sqlx::AssertSqlSafe(sql)).bind(owner).bind(until_ms).bind(now_ms);
    for id in &picked {
        q = q.bind(id);
    }
    let rows = q.fetch_all(conn).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// One delivery attempt as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    /// Id.
    pub id: String,
    /// The delivery.
    pub delivery_id: String,
    /// When (ms).
    pub attempted_at: i64,
    /// The HTTP status, if an answer came.
    pub status_code: Option<i64>,
    /// How long it took.
    pub latency_ms: i64,
    /// `succeeded`, `failed`, `refused`.
    pub outcome: String,
    /// What went wrong.
    pub error: Option<String>,
}

/// Logs an attempt.
pub async fn insert_attempt(conn: &mut AnyConnection, a: &AttemptRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO webhook_attempts (id, delivery_id, attempted_at, status_code, latency_ms, outcome, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&a.id)
    .bind(&a.delivery_id)
    .bind(a.attempted_at)
    .bind(a.status_code)
    .bind(a.latency_ms)
    .bind(&a.outcome)
    .bind(&a.error)
    .execute(conn)
    .await?;
    Ok(())
}

/// The attempts of a delivery, oldest first.
pub async fn attempts(conn: &mut AnyConnection, delivery_id: &str) -> DbResult<Vec<AttemptRow>> {
    Ok(sqlx::query_as(
        "SELECT id, delivery_id, attempted_at, status_code, latency_ms, outcome, error FROM webhook_attempts \
         WHERE delivery_id = $1 ORDER BY id",
    )
    .bind(delivery_id)
    .fetch_all(conn)
    .await?)
}

/// Records a Meta data deletion request.
pub async fn insert_deletion_request(
    conn: &mut AnyConnection,
    code: &str,
    provider: &str,
    affected: i64,
    now_ms: i64,
) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO data_deletion_requests (confirmation_code, provider, connections_affected, created_at) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(code)
    .bind(provider)
    .bind(affected)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// A data deletion request by confirmation code: (provider, connections affected, created_at).
pub async fn get_deletion_request(
    conn: &mut AnyConnection,
    code: &str,
) -> DbResult<Option<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT provider, connections_affected, created_at FROM data_deletion_requests WHERE confirmation_code = $1",
    )
    .bind(code)
    .fetch_optional(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn insert_workspace(conn: &mut AnyConnection, id: &str) {
        sqlx::query(
            "INSERT INTO workspaces (id, name, slug, created_at, updated_at) VALUES ($1, $1, $1, 0, 0)",
        )
        .bind(id)
        .execute(conn)
        .await
        .unwrap();
    }

    async fn seed(conn: &mut AnyConnection) -> (EndpointRow, DeliveryRow) {
        insert_workspace(&mut *conn, "w").await;
        let endpoint = EndpointRow {
            id: "e".into(),
            workspace_id: "w".into(),
            url: "https://hooks.example/a".into(),
            secret_sealed: "sealed-1".into(),
            previous_secret_sealed: None,
            previous_secret_until: None,
            events: "*".into(),
            enabled: 1,
            disabled_reason: None,
            description: None,
            created_at: 0,
            updated_at: 0,
        };
        insert_endpoint(conn, &endpoint).await.unwrap();
        let event = EventRow {
            id: "msg_1".into(),
            workspace_id: "w".into(),
            event_type: "webhook.test".into(),
            payload: "sealed".into(),
            created_at: 0,
        };
        insert_event(&mut *conn, &event).await.unwrap();
        let delivery = DeliveryRow {
            id: "d".into(),
            event_id: event.id,
            endpoint_id: endpoint.id.clone(),
            workspace_id: "w".into(),
            status: "pending".into(),
            attempts: 0,
            next_attempt_at: Some(0),
            lease_owner: None,
            lease_until: None,
            last_status_code: None,
            last_error: None,
            created_at: 0,
            updated_at: 0,
        };
        insert_delivery(&mut *conn, &delivery).await.unwrap();
        (endpoint, delivery)
    }

    /// Workspace `w2`, its endpoint `g` and delivery `g1` (due at 99), made from `endpoint` and
    /// `delivery`.
    async fn another_workspace_delivery(
        conn: &mut AnyConnection,
        endpoint: EndpointRow,
        delivery: DeliveryRow,
    ) {
        insert_workspace(&mut *conn, "w2").await;
        let foreign = EndpointRow {
            id: "g".into(),
            workspace_id: "w2".into(),
            url: "https://hooks.example/g".into(),
            ..endpoint
        };
        insert_endpoint(&mut *conn, &foreign).await.unwrap();
        let g = DeliveryRow {
            id: "g1".into(),
            endpoint_id: "g".into(),
            workspace_id: "w2".into(),
            next_attempt_at: Some(99),
            ..delivery
        };
        insert_delivery(&mut *conn, &g).await.unwrap();
    }

    #[tokio::test]
    async fn only_the_current_claim_writes_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let (_, d) = seed(&mut conn).await;
        assert_eq!(claim_due(&mut conn, Backend::Sqlite, "a", 1_000, 61_000, 10).await.unwrap(), vec!["d"]);
        // Held: nobody else can claim it.
        assert!(claim_due(&mut conn, Backend::Sqlite, "b", 2_000, 62_000, 10).await.unwrap().is_empty());
        // a's lease runs out and b takes the delivery.
        assert_eq!(claim_due(&mut conn, Backend::Sqlite, "b", 61_001, 121_001, 10).await.unwrap(), vec!["d"]);
        let done = DeliveryRow { status: "succeeded".into(), attempts: 1, next_attempt_at: None, ..d };
        assert!(!finish_delivery(&mut conn, &done, "a", 61_000).await.unwrap(), "a lost its claim");
        // The same owner with an older claim is refused too: the claim is (owner, until).
        assert!(!finish_delivery(&mut conn, &done, "b", 61_000).await.unwrap());
        assert!(finish_delivery(&mut conn, &done, "b", 121_001).await.unwrap());
        assert!(!finish_delivery(&mut conn, &done, "b", 121_001).await.unwrap(), "written once");
        let row = get_delivery(&mut conn, "d").await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.attempts, row.lease_owner), ("succeeded", 1, None));
        // A released claim makes the delivery claimable at once.
        restart_delivery(&mut conn, "d", 200_000).await.unwrap();
        assert_eq!(
            claim_due(&mut conn, Backend::Sqlite, "a", 200_000, 260_000, 10).await.unwrap(),
            vec!["d"]
        );
        release_claim(&mut conn, "d", "a", 260_000).await.unwrap();
        assert_eq!(
            claim_due(&mut conn, Backend::Sqlite, "b", 200_001, 260_001, 10).await.unwrap(),
            vec!["d"]
        );
        drop(conn);
        db.close().await;
    }

    #[tokio::test]
    async fn disabling_keeps_changes_made_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let (read_before, _) = seed(&mut conn).await;
        // While an attempt is in flight, the secret is rotated and a note added.
        let rotated = EndpointRow {
            secret_sealed: "sealed-2".into(),
            previous_secret_sealed: Some("sealed-1".into()),
            previous_secret_until: Some(99),
            description: Some("note".into()),
            updated_at: 5,
            ..read_before.clone()
        };
        update_endpoint(&mut conn, &rotated).await.unwrap();
        assert!(disable_endpoint(&mut conn, &read_before.id, &read_before.url, "gone", 10).await.unwrap());
        let row = get_endpoint(&mut conn, "e").await.unwrap().unwrap();
        assert_eq!(row.enabled, 0);
        assert_eq!(row.disabled_reason.as_deref(), Some("gone"));
        assert_eq!(row.secret_sealed, "sealed-2");
        assert_eq!(row.previous_secret_sealed.as_deref(), Some("sealed-1"));
        assert_eq!(row.previous_secret_until, Some(99));
        assert_eq!(row.description.as_deref(), Some("note"));
        assert_eq!(row.updated_at, 10);
        // Already disabled: the first reason stays.
        assert!(!disable_endpoint(&mut conn, "e", &read_before.url, "again", 11).await.unwrap());
        // Moved to another URL meanwhile: a failure of the old one does not disable it.
        let moved = EndpointRow { url: "https://hooks.example/b".into(), enabled: 1, ..row };
        update_endpoint(&mut conn, &moved).await.unwrap();
        assert!(!disable_endpoint(&mut conn, "e", &read_before.url, "gone", 12).await.unwrap());
        assert_eq!(get_endpoint(&mut conn, "e").await.unwrap().unwrap().enabled, 1);
        drop(conn);
        db.close().await;
    }

    /// Finished deliveries past the retention go with their attempts and events; pending ones,
    /// recent ones and events still delivered stay; a previous secret is forgotten once it stopped
    /// signing.
    #[tokio::test]
    async fn housekeeping_removes_only_what_is_finished_and_old() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let (_, delivery) = seed(&mut conn).await;
        let db = &db;
        let count = |table: &'static str| {
            let q = format!("SELECT COUNT(*) FROM {table}");
            async move {
                let mut c = db.read().await.unwrap();
                sqlx::query_as::<_, (i64,)>(sqlx::AssertSqlSafe(&*q)).fetch_one(&mut *c).await.unwrap().0
            }
        };
        // Pending: kept, however old.
        assert_eq!(purge_finished(&mut conn, 1_000, 10).await.unwrap(), (0, 0));
        insert_attempt(
            &mut conn,
            &AttemptRow {
                id: "a".into(),
                delivery_id: delivery.id.clone(),
                attempted_at: 40,
                status_code: Some(200),
                latency_ms: 3,
                outcome: "succeeded".into(),
                error: None,
            },
        )
        .await
        .unwrap();
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'succeeded', next_attempt_at = NULL, updated_at = 50",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        // An event without deliveries, made after the cut-off: kept.
        let later = EventRow {
            id: "msg_2".into(),
            workspace_id: "w".into(),
            event_type: "webhook.test".into(),
            payload: "sealed".into(),
            created_at: 200,
        };
        insert_event(&mut *conn, &later).await.unwrap();
        // Finished after the cut-off: kept.
        assert_eq!(purge_finished(&mut conn, 40, 10).await.unwrap(), (0, 0));
        assert_eq!(purge_finished(&mut conn, 100, 10).await.unwrap(), (1, 1));
        drop(conn);
        assert_eq!(count("webhook_attempts").await, 0);
        assert_eq!(count("webhook_deliveries").await, 0);
        assert_eq!(count("webhook_events").await, 1, "the later event stays");
        let mut conn = db.writer().await.unwrap();
        sqlx::query(
            "UPDATE webhook_endpoints SET previous_secret_sealed = 'old', previous_secret_until = 10",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        assert_eq!(forget_previous_secrets(&mut conn, 5).await.unwrap(), 0, "still signing");
        assert_eq!(forget_previous_secrets(&mut conn, 20).await.unwrap(), 1);
        let e = get_endpoint(&mut conn, "e").await.unwrap().unwrap();
        assert_eq!((e.previous_secret_sealed.as_deref(), e.previous_secret_until), (None, None));
        // A removed endpoint goes once no delivery refers to it and its removal is past the
        // retention; one still referred to, a recent one and one not removed stay.
        assert_eq!(purge_removed_endpoints(&mut conn, 1_000, 10).await.unwrap(), 0, "not removed");
        let removed = EndpointRow { events: EndpointRow::REMOVED.into(), updated_at: 60, ..e };
        update_endpoint(&mut conn, &removed).await.unwrap();
        for (id, updated_at) in [("r-recent", 500), ("r-referred", 60)] {
            let other = EndpointRow { id: id.into(), updated_at, ..removed.clone() };
            insert_endpoint(&mut conn, &other).await.unwrap();
        }
        let referring = DeliveryRow {
            id: "d-r".into(),
            endpoint_id: "r-referred".into(),
            event_id: later.id,
            ..delivery
        };
        insert_delivery(&mut *conn, &referring).await.unwrap();
        assert_eq!(purge_removed_endpoints(&mut conn, 100, 10).await.unwrap(), 1);
        assert!(get_endpoint(&mut conn, "e").await.unwrap().is_none(), "removed long ago, no delivery");
        assert!(get_endpoint(&mut conn, "r-recent").await.unwrap().is_some());
        assert!(get_endpoint(&mut conn, "r-referred").await.unwrap().is_some());
        drop(conn);
        db.close().await;
    }

    /// An endpoint gets at most two deliveries in flight, whatever is due for it: the others'
    /// deliveries are claimed beside them.
    #[tokio::test]
    async fn claims_leave_room_for_other_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let (endpoint, delivery) = seed(&mut conn).await;
        for i in 2..=4 {
            let d = DeliveryRow { id: format!("d{i}"), next_attempt_at: Some(i), ..delivery.clone() };
            insert_delivery(&mut *conn, &d).await.unwrap();
        }
        let other = EndpointRow { id: "f".into(), url: "https://hooks.example/f".into(), ..endpoint };
        insert_endpoint(&mut conn, &other).await.unwrap();
        let f =
            DeliveryRow { id: "f1".into(), endpoint_id: "f".into(), next_attempt_at: Some(10), ..delivery };
        insert_delivery(&mut *conn, &f).await.unwrap();
        let mut first = claim_due(&mut conn, Backend::Sqlite, "a", 100, 60_100, 3).await.unwrap();
        first.sort();
        assert_eq!(first, ["d", "d2", "f1"], "two of e's, and f's beside them");
        assert!(
            claim_due(&mut conn, Backend::Sqlite, "b", 200, 60_200, 3).await.unwrap().is_empty(),
            "e is full"
        );
        drop(conn);
        db.close().await;
    }

    /// A workspace gets at most four deliveries in flight, however many endpoints it has: another
    /// workspace's deliveries, due later, are claimed beside them.
    #[tokio::test]
    async fn claims_leave_room_for_other_workspaces() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let (endpoint, delivery) = seed(&mut conn).await;
        // Four more endpoints of the same workspace, two due deliveries each (ten in all).
        for e in 1..=4 {
            let ep = EndpointRow {
                id: format!("e{e}"),
                url: format!("https://hooks.example/{e}"),
                ..endpoint.clone()
            };
            insert_endpoint(&mut conn, &ep).await.unwrap();
            for i in 0..2 {
                let d = DeliveryRow {
                    id: format!("e{e}-{i}"),
                    endpoint_id: ep.id.clone(),
                    next_attempt_at: Some(e * 10 + i),
                    ..delivery.clone()
                };
                insert_delivery(&mut *conn, &d).await.unwrap();
            }
        }
        let d2 = DeliveryRow { id: "d2".into(), next_attempt_at: Some(2), ..delivery.clone() };
        insert_delivery(&mut *conn, &d2).await.unwrap();
        // Another workspace's delivery, due after all of them.
        another_workspace_delivery(&mut conn, endpoint, delivery).await;
        let mut first = claim_due(&mut conn, Backend::Sqlite, "a", 100, 60_100, 10).await.unwrap();
        first.sort();
        assert_eq!(
            first,
            ["d", "d2", "e1-0", "e1-1", "g1"],
            "four of the first workspace's, and the other's"
        );
        let second = claim_due(&mut conn, Backend::Sqlite, "b", 200, 60_200, 10).await.unwrap();
        assert!(second.is_empty(), "the first workspace is full: {second:?}");
        drop(conn);
        db.close().await;
    }

    /// One endpoint's backlog, far longer than a round's candidates and older than anything
    /// else, does not hide another workspace's delivery: each endpoint offers its two oldest.
    #[tokio::test]
    async fn a_backlog_does_not_hide_other_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let (endpoint, delivery) = seed(&mut conn).await;
        for i in 1..=50 {
            let d = DeliveryRow { id: format!("b{i:02}"), next_attempt_at: Some(i), ..delivery.clone() };
            insert_delivery(&mut *conn, &d).await.unwrap();
        }
        another_workspace_delivery(&mut conn, endpoint, delivery).await;
        // A round of four (sixteen candidates, all of them the backlog's before): the backlog's
        // two oldest (its limit in flight), and the other workspace's.
        let mut claimed = claim_due(&mut conn, Backend::Sqlite, "a", 100, 60_100, 4).await.unwrap();
        claimed.sort();
        assert_eq!(claimed, ["b01", "d", "g1"]);
        drop(conn);
        db.close().await;
    }

    /// A delivery whose attempt is under way is not restarted (a second attempt would run beside
    /// it); once the claim has run out, it is.
    #[tokio::test]
    async fn a_delivery_in_flight_is_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let mut conn = db.writer().await.unwrap();
        seed(&mut conn).await;
        assert!(restart_delivery(&mut conn, "d", 500).await.unwrap(), "pending, never claimed");
        assert_eq!(claim_due(&mut conn, Backend::Sqlite, "a", 1_000, 61_000, 10).await.unwrap(), vec!["d"]);
        assert!(!restart_delivery(&mut conn, "d", 2_000).await.unwrap(), "in flight");
        let row = get_delivery(&mut conn, "d").await.unwrap().unwrap();
        assert_eq!(row.lease_owner.as_deref(), Some("a"), "the claim stands");
        assert!(restart_delivery(&mut conn, "d", 61_001).await.unwrap(), "the claim ran out");
        drop(conn);
        db.close().await;
    }
}
