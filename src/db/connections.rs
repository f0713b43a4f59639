//! The `connections` and `connection_events` tables: connected provider accounts, their sealed
//! tokens, status and history.

use std::fmt::Write as _;
use std::sync::LazyLock;

use sqlx::AnyConnection;

use super::DbResult;
use super::stmt::{Arg, Exec, Stmt, from_lite, stmt};

/// A connection as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConnectionRow {
    /// Id (UUIDv7).
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// The link it was last connected through.
    pub link_id: Option<String>,
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// The provider's stable account id.
    pub provider_account_id: String,
    /// Instagram's app-scoped id.
    pub app_scoped_id: Option<String>,
    /// Handle.
    pub username: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
    /// Comma-separated granted scopes.
    pub scopes: String,
    /// Sealed for `connections/<id>/access_token`.
    pub access_token_sealed: Option<String>,
    /// Access token expiry (ms).
    pub access_expires_at: Option<i64>,
    /// Sealed for `connections/<id>/refresh_token`.
    pub refresh_token_sealed: Option<String>,
    /// Refresh token expiry (ms).
    pub refresh_expires_at: Option<i64>,
    /// Increases with each new token pair.
    pub token_generation: i64,
    /// `active`, `broken` or `disconnected`.
    pub status: String,
    /// Why it is broken or disconnected.
    pub status_reason: Option<String>,
    /// 1 when made against the sandbox.
    pub sandbox: i64,
    /// First connection (ms).
    pub connected_at: i64,
    /// Last token refresh (ms).
    pub last_refreshed_at: Option<i64>,
    /// How many times the account was connected again.
    pub reconnect_count: i64,
    /// Row creation (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// When the scheduler should refresh next (ms).
    pub next_refresh_at: Option<i64>,
    /// The process holding the refresh lease.
    pub lease_owner: Option<String>,
    /// Until when it holds it (ms).
    pub lease_until: Option<i64>,
    /// Consecutive transient refresh failures.
    pub refresh_failures: i64,
    /// When the next health check is due (ms).
    pub next_check_at: Option<i64>,
    /// Last health check (ms).
    pub last_checked_at: Option<i64>,
    /// When `connection.expiring` was announced for the current grant (ms).
    pub expiring_notified_at: Option<i64>,
}

from_lite!(ConnectionRow {
    id,
    workspace_id,
    link_id,
    provider,
    provider_account_id,
    app_scoped_id,
    username,
    display_name,
    avatar_url,
    scopes,
    access_token_sealed,
    access_expires_at,
    refresh_token_sealed,
    refresh_expires_at,
    token_generation,
    status,
    status_reason,
    sandbox,
    connected_at,
    last_refreshed_at,
    reconnect_count,
    created_at,
    updated_at,
    next_refresh_at,
    lease_owner,
    lease_until,
    refresh_failures,
    next_check_at,
    last_checked_at,
    expiring_notified_at
});

/// The columns of a [`ConnectionRow`], read from [`FROM`].
const COLUMNS: &str = "id, workspace_id, link_id, provider, provider_account_id, app_scoped_id, username, \
    display_name, avatar_url, scopes, access_token_sealed, access_expires_at, refresh_token_sealed, \
    refresh_expires_at, token_generation, status, status_reason, sandbox, connected_at, last_refreshed_at, \
    reconnect_count, created_at, updated_at, next_refresh_at, lease_owner, lease_until, refresh_failures, \
    next_check_at, last_checked_at, expiring_notified_at";

/// A connection with its refresh schedule and lease, which live in `refresh_schedule` so that
/// storing refreshed tokens moves no indexed column of `connections` (see migration 0008).
/// Their column names are distinct from those of `connections`.
const FROM: &str =
    "connections LEFT JOIN refresh_schedule ON refresh_schedule.connection_id = connections.id";

/// The schedule's next refresh as stored: none unless the connection is active, so that the
/// scheduler's claim needs no join.
fn stored_next_refresh(c: &ConnectionRow) -> Option<i64> {
    if c.status == "active" { c.next_refresh_at } else { None }
}

/// Inserts a connection and its refresh schedule (the lease starts free). Callers run it in a
/// transaction: it is two statements.
pub async fn insert(conn: &mut impl Exec, c: &ConnectionRow) -> DbResult<()> {
    if insert_if_absent(conn, c).await? {
        Ok(())
    } else {
        Err(super::DbError::Conflict("connection for this account".into()))
    }
}

/// [`insert`], unless the workspace already holds a connection of this account (one stored by a
/// concurrent transaction since the caller looked): then nothing is written and `false` comes
/// back, without aborting the transaction.
pub async fn insert_if_absent(conn: &mut impl Exec, c: &ConnectionRow) -> DbResult<bool> {
    const SQL: &str = "INSERT INTO connections (id, workspace_id, link_id, provider, provider_account_id, \
        app_scoped_id, username, display_name, avatar_url, scopes, access_token_sealed, access_expires_at, \
        refresh_token_sealed, refresh_expires_at, token_generation, status, status_reason, sandbox, connected_at, \
        last_refreshed_at, reconnect_count, created_at, updated_at, refresh_failures, next_check_at, \
        last_checked_at, expiring_notified_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
        $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27) \
        ON CONFLICT (workspace_id, provider, provider_account_id) DO NOTHING";
    let s = stmt!(
        SQL,
        &c.id,
        &c.workspace_id,
        &c.link_id,
        &c.provider,
        &c.provider_account_id,
        &c.app_scoped_id,
        &c.username,
        &c.display_name,
        &c.avatar_url,
        &c.scopes,
        &c.access_token_sealed,
        c.access_expires_at,
        &c.refresh_token_sealed,
        c.refresh_expires_at,
        c.token_generation,
        &c.status,
        &c.status_reason,
        c.sandbox,
        c.connected_at,
        c.last_refreshed_at,
        c.reconnect_count,
        c.created_at,
        c.updated_at,
        c.refresh_failures,
        c.next_check_at,
        c.last_checked_at,
        c.expiring_notified_at,
    );
    if conn.execute(&s).await? == 0 {
        return Ok(false);
    }
    let s = stmt!(
        "INSERT INTO refresh_schedule (connection_id, next_refresh_at) VALUES ($1, $2)",
        &c.id,
        stored_next_refresh(c)
    );
    conn.execute(&s).await?;
    Ok(true)
}

/// Writes every mutable column of `c` and its next refresh (not the lease, which only the lease
/// functions change). Callers run it in a transaction: it is two statements.
pub async fn update(conn: &mut impl Exec, c: &ConnectionRow) -> DbResult<()> {
    update_changed(conn, c, Indexed::ALL).await
}

/// Which of a connection's indexed mutable columns an update writes.
///
/// SQLite rewrites the entries of every index on a column named in an `UPDATE`'s `SET` list,
/// changed or not, and each index page so touched is one more page in the WAL: a reconnect
/// through the same link, which changes none of them, wrote four index pages for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indexed {
    /// `link_id` (index `connections_link_id`).
    pub link_id: bool,
    /// `username` (the two handle indexes).
    pub username: bool,
    /// `status` (the status indexes, the partial health-check index and the per-status
    /// counters' trigger).
    pub status: bool,
}

impl Indexed {
    /// Every indexed column.
    pub const ALL: Self = Self { link_id: true, username: true, status: true };
    /// None of them (the caller changed none).
    pub const NONE: Self = Self { link_id: false, username: false, status: false };
}

/// [`update`], writing of the indexed columns only those `indexed` names; the others keep their
/// values in the database, which the caller knows to equal those of `c`.
pub async fn update_changed(conn: &mut impl Exec, c: &ConnectionRow, indexed: Indexed) -> DbResult<()> {
    write_row(conn, c, indexed, None).await.map(drop)
}

/// [`update`], only if the stored row still has token generation `generation` and status
/// `status`, the values the caller read it with: a row changed meanwhile (refreshed,
/// reconnected, disconnected) is not overwritten with the caller's stale copy. Returns whether
/// it was written.
pub async fn update_if_unchanged(
    conn: &mut impl Exec,
    c: &ConnectionRow,
    generation: i64,
    status: &str,
) -> DbResult<bool> {
    write_row(conn, c, Indexed::ALL, Some((generation, status))).await
}

/// Breaks a connection whose tokens and status are still `generation` and `status` (as the
/// caller read them, before asking the provider): writes only the status, its reason, the
/// cleared schedules and `updated_at`, so that every other column stays as whoever wrote it
/// last left it. Returns whether it was written; the caller runs it in a transaction (it is two
/// statements).
pub async fn set_broken_if_unchanged(
    conn: &mut impl Exec,
    id: &str,
    reason: &str,
    now_ms: i64,
    generation: i64,
    status: &str,
) -> DbResult<bool> {
    let s = stmt!(
        "UPDATE connections SET status = 'broken', status_reason = $2, next_check_at = NULL, updated_at = $3 \
         WHERE id = $1 AND token_generation = $4 AND status = $5",
        id,
        reason,
        now_ms,
        generation,
        status
    );
    if conn.execute(&s).await? == 0 {
        return Ok(false);
    }
    let s = stmt!("UPDATE refresh_schedule SET next_refresh_at = NULL WHERE connection_id = $1", id);
    conn.execute(&s).await?;
    Ok(true)
}

/// Marks an expiry announcement as made, once: only if none was made for this grant (and its
/// tokens are still those of `generation`). Returns whether this call made it.
pub async fn mark_expiring_notified(
    conn: &mut impl Exec,
    id: &str,
    generation: i64,
    now_ms: i64,
) -> DbResult<bool> {
    let s = stmt!(
        "UPDATE connections SET expiring_notified_at = $2, updated_at = $2 WHERE id = $1 \
         AND expiring_notified_at IS NULL AND token_generation = $3",
        id,
        now_ms,
        generation
    );
    Ok(conn.execute(&s).await? == 1)
}

async fn write_row(
    conn: &mut impl Exec,
    c: &ConnectionRow,
    indexed: Indexed,
    expect: Option<(i64, &str)>,
) -> DbResult<bool> {
    let mut sql = String::from(
        "UPDATE connections SET app_scoped_id = $2, display_name = $3, avatar_url = $4, scopes = $5, \
         access_token_sealed = $6, access_expires_at = $7, refresh_token_sealed = $8, refresh_expires_at = $9, \
         token_generation = $10, sandbox = $11, last_refreshed_at = $12, reconnect_count = $13, updated_at = $14, \
         refresh_failures = $15, next_check_at = $16, last_checked_at = $17, expiring_notified_at = $18, \
         status_reason = $19",
    );
    let mut args = vec![
        Arg::from(&c.id),
        Arg::from(&c.app_scoped_id),
        Arg::from(&c.display_name),
        Arg::from(&c.avatar_url),
        Arg::from(&c.scopes),
        Arg::from(&c.access_token_sealed),
        Arg::from(c.access_expires_at),
        Arg::from(&c.refresh_token_sealed),
        Arg::from(c.refresh_expires_at),
        Arg::from(c.token_generation),
        Arg::from(c.sandbox),
        Arg::from(c.last_refreshed_at),
        Arg::from(c.reconnect_count),
        Arg::from(c.updated_at),
        Arg::from(c.refresh_failures),
        Arg::from(c.next_check_at),
        Arg::from(c.last_checked_at),
        Arg::from(c.expiring_notified_at),
        Arg::from(&c.status_reason),
    ];
    for (column, arg, wanted) in [
        ("link_id", Arg::from(&c.link_id), indexed.link_id),
        ("username", Arg::from(&c.username), indexed.username),
        ("status", Arg::from(&c.status), indexed.status),
    ] {
        if wanted {
            args.push(arg);
            let _ = write!(sql, ", {column} = ${}", args.len());
        }
    }
    sql.push_str(" WHERE id = $1");
    if let Some((generation, status)) = expect {
        args.push(Arg::from(generation));
        let _ = write!(sql, " AND token_generation = ${}", args.len());
        args.push(Arg::from(status));
        let _ = write!(sql, " AND status = ${}", args.len());
    }
    if conn.execute(&Stmt::new(&sql, args)).await? == 0 && expect.is_some() {
        return Ok(false);
    }
    let s = stmt!(
        "UPDATE refresh_schedule SET next_refresh_at = $2 WHERE connection_id = $1",
        &c.id,
        stored_next_refresh(c)
    );
    conn.execute(&s).await?;
    Ok(true)
}

/// One connection by id.
pub async fn get(conn: &mut impl Exec, id: &str) -> DbResult<Option<ConnectionRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {COLUMNS} FROM {FROM} WHERE id = $1"));
    conn.fetch_optional(&stmt!(&SQL, id)).await
}

/// [`get`] in a write transaction that will update the row: on PostgreSQL the row is locked
/// (`FOR UPDATE`) until the transaction ends, so that a writer that read it here cannot undo
/// another's change made between its read and its write (a refresh on another instance, say);
/// SQLite's write transactions already run one at a time.
pub async fn get_for_update(
    conn: &mut impl Exec,
    backend: super::Backend,
    id: &str,
) -> DbResult<Option<ConnectionRow>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {COLUMNS} FROM {FROM} WHERE id = $1 FOR UPDATE OF connections"));
    match backend {
        super::Backend::Postgres => conn.fetch_optional(&stmt!(&SQL, id)).await,
        super::Backend::Sqlite => get(conn, id).await,
    }
}

/// The connection of one provider account in one workspace.
pub async fn get_by_account(
    conn: &mut impl Exec,
    workspace_id: &str,
    provider: &str,
    account_id: &str,
) -> DbResult<Option<ConnectionRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM {FROM} WHERE workspace_id = $1 AND provider = $2 AND provider_account_id = $3"
        )
    });
    conn.fetch_optional(&stmt!(&SQL, workspace_id, provider, account_id)).await
}

/// [`get_by_account`] in a write transaction that will update the row: on PostgreSQL the row is
/// locked (`FOR UPDATE`) until the transaction ends, so that two reconnects of one account run
/// one after the other and neither loses the other's changes; SQLite's write transactions
/// already do.
pub async fn get_by_account_for_update(
    conn: &mut impl Exec,
    backend: super::Backend,
    workspace_id: &str,
    provider: &str,
    account_id: &str,
) -> DbResult<Option<ConnectionRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM {FROM} WHERE workspace_id = $1 AND provider = $2 AND provider_account_id = $3 \
             FOR UPDATE OF connections"
        )
    });
    match backend {
        super::Backend::Postgres => {
            conn.fetch_optional(&stmt!(&SQL, workspace_id, provider, account_id)).await
        }
        super::Backend::Sqlite => get_by_account(conn, workspace_id, provider, account_id).await,
    }
}

/// Filters for [`list`].
#[derive(Debug, Default, Clone)]
pub struct ConnectionFilter<'a> {
    /// Only this workspace.
    pub workspace_id: Option<&'a str>,
    /// Only this status.
    pub status: Option<&'a str>,
    /// Only this provider.
    pub provider: Option<&'a str>,
    /// Only connections last made through this link.
    pub link_id: Option<&'a str>,
    /// Connections older than this id (the cursor).
    pub before: Option<&'a str>,
}

/// The statement of [`list`] for the filters `f` sets: only those filters appear in it, so that
/// each combination is answered from its index (`workspace_id` with `id`, `link_id`, ...) instead
/// of a scan of every connection that tests each optional filter. Placeholders follow the order
/// of [`ConnectionFilter`]'s fields, then the limit.
fn list_sql(f: &ConnectionFilter<'_>) -> String {
    let mut conditions = Vec::new();
    // With a link, its index answers (a link has few connections, a workspace may have many):
    // the workspace is then checked on each of the link's rows, in a form no index serves, so
    // that the planner does not walk the whole workspace in id order instead.
    let workspace = if f.link_id.is_some() { "workspace_id || '' = " } else { "workspace_id = " };
    for (set, condition) in [
        (f.workspace_id.is_some(), workspace),
        (f.status.is_some(), "status = "),
        (f.provider.is_some(), "provider = "),
        (f.link_id.is_some(), "link_id = "),
        (f.before.is_some(), "id < "),
    ] {
        if set {
            conditions.push(format!("{condition}${}", conditions.len() + 1));
        }
    }
    let filter =
        if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) };
    format!("SELECT {COLUMNS} FROM {FROM}{filter} ORDER BY id DESC LIMIT ${}", conditions.len() + 1)
}

/// Newest first, one page.
pub async fn list(
    conn: &mut impl Exec,
    f: &ConnectionFilter<'_>,
    limit: i64,
) -> DbResult<Vec<ConnectionRow>> {
    let sql = list_sql(f);
    let mut args: Vec<Arg<'_>> = [f.workspace_id, f.status, f.provider, f.link_id, f.before]
        .into_iter()
        .flatten()
        .map(Arg::Text)
        .collect();
    args.push(Arg::Int(limit));
    conn.fetch_all(&Stmt::new(&sql, args)).await
}

/// An event in a connection's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// Id (UUIDv7).
    pub id: String,
    /// The connection.
    pub connection_id: String,
    /// Its workspace.
    pub workspace_id: String,
    /// `created`, `reconnected`, `refreshed`, `broken`, `disconnected`, ...
    pub kind: String,
    /// Readable detail.
    pub detail: Option<String>,
    /// When (ms).
    pub created_at: i64,
}

/// Appends an event.
pub async fn insert_event(conn: &mut impl Exec, e: &EventRow) -> DbResult<()> {
    const SQL: &str = "INSERT INTO connection_events (id, connection_id, workspace_id, kind, detail, created_at) \
        VALUES ($1, $2, $3, $4, $5, $6)";
    conn.execute(&stmt!(SQL, &e.id, &e.connection_id, &e.workspace_id, &e.kind, &e.detail, e.created_at))
        .await?;
    Ok(())
}

/// A connection's history, oldest first.
pub async fn events(conn: &mut AnyConnection, connection_id: &str) -> DbResult<Vec<EventRow>> {
    Ok(sqlx::query_as(
        "SELECT id, connection_id, workspace_id, kind, detail, created_at FROM connection_events \
         WHERE connection_id = $1 ORDER BY id",
    )
    .bind(connection_id)
    .fetch_all(conn)
    .await?)
}

/// Takes the refresh lease of one active connection if nobody holds it (or the holder's lease
/// ran out). Returns whether this caller now holds it.
pub async fn try_lease(
    conn: &mut AnyConnection,
    id: &str,
    owner: &str,
    now_ms: i64,
    until_ms: i64,
) -> DbResult<bool> {
    let done = sqlx::query(
        "UPDATE refresh_schedule SET lease_owner = $2, lease_until = $3 \
         WHERE connection_id = $1 AND (lease_until IS NULL OR lease_until < $4 OR lease_owner = $2) \
         AND EXISTS (SELECT 1 FROM connections WHERE id = $1 AND status = 'active')",
    )
    .bind(id)
    .bind(owner)
    .bind(until_ms)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the lease back (only if `owner` still holds it).
pub async fn release_lease(conn: &mut AnyConnection, id: &str, owner: &str) -> DbResult<()> {
    sqlx::query(
        "UPDATE refresh_schedule SET lease_owner = NULL, lease_until = NULL WHERE connection_id = $1 AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives back a claim the scheduler made (until `until_ms`) and did not start: only that claim,
/// not a lease the same process took again since for a refresh asked for meanwhile, which is
/// running.
pub async fn release_claim(conn: &mut AnyConnection, id: &str, owner: &str, until_ms: i64) -> DbResult<()> {
    sqlx::query(
        "UPDATE refresh_schedule SET lease_owner = NULL, lease_until = NULL \
         WHERE connection_id = $1 AND lease_owner = $2 AND lease_until = $3",
    )
    .bind(id)
    .bind(owner)
    .bind(until_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes a connection that is not active off the refresh schedule (in a transaction that has
/// locked the connection's row). `next_refresh_at` is set only for active connections; a row
/// that breaks that rule (written by an older version, or by a race this guards against) would
/// be claimed and given back at every round.
pub async fn unschedule_inactive(conn: &mut AnyConnection, id: &str) -> DbResult<()> {
    sqlx::query(
        "UPDATE refresh_schedule SET next_refresh_at = NULL WHERE connection_id = $1 \
         AND next_refresh_at IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM connections WHERE id = $1 AND status = 'active')",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Who holds the lease of a connection, until when, and its token generation.
pub async fn lease_state(
    conn: &mut AnyConnection,
    id: &str,
) -> DbResult<Option<(Option<String>, Option<i64>, i64)>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT lease_owner, lease_until, token_generation FROM {FROM} WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The SQL condition that a connection (its columns prefixed with `$qualifier`) is of one of the
/// kinds named in the comma-separated text parameter `$param`:
/// [`Providers::served`](crate::providers::Providers::served)'s names, by provider and whether
/// made with the sandbox ([`served_name`](crate::providers::served_name)).
macro_rules! served {
    ($qualifier:literal, $param:literal) => {
        concat!(
            "',' || ",
            $param,
            " || ',' LIKE '%,' || ",
            $qualifier,
            "provider || CASE WHEN ",
            $qualifier,
            "sandbox = 0 THEN '' ELSE ':sandbox' END || ',%'"
        )
    };
}

/// Claims up to `limit` active connections whose refresh is due and whose lease is free, of the
/// kinds named in `providers` ([`Providers::served`](crate::providers::Providers::served): those
/// this process serves, by provider and sandbox or not; the others stay
/// due for a process that serves them, and never fill a batch here), for `owner`, and returns
/// their ids. On PostgreSQL rows locked by a concurrent claimer are skipped (`FOR UPDATE SKIP
/// LOCKED`); on SQLite the caller runs this inside an immediate transaction, which serialises
/// claimers.
pub async fn claim_due_refreshes(
    conn: &mut AnyConnection,
    backend: super::Backend,
    owner: &str,
    now_ms: i64,
    until_ms: i64,
    limit: i64,
    providers: &str,
) -> DbResult<Vec<String>> {
    // `next_refresh_at` is set only for active connections (see `stored_next_refresh`).
    let ids = super::claimed_ids(
        backend,
        "connection_id",
        concat!(
            "SELECT connection_id FROM refresh_schedule WHERE next_refresh_at <= $3 \
             AND (lease_until IS NULL OR lease_until < $3) \
             AND EXISTS (SELECT 1 FROM connections c WHERE c.id = refresh_schedule.connection_id AND ",
            served!("c.", "$5"),
            ") ORDER BY next_refresh_at LIMIT $4"
        ),
    );
    let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE refresh_schedule SET lease_owner = $1, lease_until = $2 WHERE {ids} RETURNING connection_id"
    )))
    .bind(owner)
    .bind(until_ms)
    .bind(now_ms)
    .bind(limit)
    .bind(providers)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Ids of active connections of the kinds named in `providers` (as in [`claim_due_refreshes`])
/// whose health check is due (oldest first).
pub async fn due_checks(
    conn: &mut AnyConnection,
    now_ms: i64,
    limit: i64,
    providers: &str,
) -> DbResult<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(concat!(
        "SELECT id FROM connections WHERE status = 'active' AND next_check_at <= $1 AND ",
        served!("", "$3"),
        " ORDER BY next_check_at LIMIT $2"
    ))
    .bind(now_ms)
    .bind(limit)
    .bind(providers)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// How many active connections there are of each provider, made with its sandbox (`1`) or not
/// (`0`).
pub async fn active_by_kind(conn: &mut AnyConnection) -> DbResult<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT provider, sandbox, COUNT(*) FROM connections WHERE status = 'active' GROUP BY provider, sandbox",
    )
    .fetch_all(conn)
    .await?)
}

/// Takes a due health check for this process: moves it to `next_ms` only if it is still due at
/// `now_ms`, so that of several processes that found it due, one runs it. Returns whether this
/// call took it.
pub async fn claim_check(conn: &mut AnyConnection, id: &str, now_ms: i64, next_ms: i64) -> DbResult<bool> {
    let done = sqlx::query(
        "UPDATE connections SET next_check_at = $2 WHERE id = $1 AND status = 'active' AND next_check_at <= $3",
    )
    .bind(id)
    .bind(next_ms)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Moves a connection's next health check.
pub async fn set_next_check(conn: &mut AnyConnection, id: &str, at_ms: i64) -> DbResult<()> {
    sqlx::query("UPDATE connections SET next_check_at = $2 WHERE id = $1")
        .bind(id)
        .bind(at_ms)
        .execute(conn)
        .await?;
    Ok(())
}

/// Connections whose grant runs out before `soon_ms` and that were not yet announced: a refresh
/// token about to expire, or (without a refresh token) an access token about to expire while
/// the connection is broken or failing to refresh.
pub async fn expiring(
    conn: &mut AnyConnection,
    now_ms: i64,
    soon_ms: i64,
    limit: i64,
) -> DbResult<Vec<ConnectionRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM {FROM} WHERE status IN ('active', 'broken') AND expiring_notified_at IS NULL \
         AND ((refresh_expires_at IS NOT NULL AND refresh_expires_at <= $1) \
           OR (refresh_token_sealed IS NULL AND access_expires_at <= $1 \
               AND (status = 'broken' OR refresh_failures > 0 OR access_expires_at <= $2))) \
         ORDER BY id LIMIT $3"
    )))
    .bind(soon_ms)
    .bind(now_ms)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Active Instagram-style connections by the provider's app-scoped id (deauthorization), in a
/// write transaction that will update them (locked on PostgreSQL, as [`get_for_update`]).
pub async fn by_app_scoped_id_for_update(
    conn: &mut AnyConnection,
    backend: super::Backend,
    provider: &str,
    app_scoped_id: &str,
) -> DbResult<Vec<ConnectionRow>> {
    let lock = match backend {
        super::Backend::Postgres => " ORDER BY id FOR UPDATE OF connections",
        super::Backend::Sqlite => "",
    };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM {FROM} WHERE provider = $1 AND (app_scoped_id = $2 OR provider_account_id = $2){lock}"
    )))
    .bind(provider)
    .bind(app_scoped_id)
    .fetch_all(conn)
    .await?)
}

/// A refresh attempt as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    /// Id.
    pub id: String,
    /// The connection.
    pub connection_id: String,
    /// The process that made it.
    pub owner: String,
    /// The token generation it started from.
    pub generation: i64,
    /// `started`, `succeeded`, `transient`, `permanent`, `interrupted`, `superseded`.
    pub outcome: String,
    /// Readable detail.
    pub detail: Option<String>,
    /// Start (ms).
    pub started_at: i64,
    /// End (ms).
    pub finished_at: Option<i64>,
}

/// Records the start of a refresh attempt (committed before the provider is called).
pub async fn insert_attempt(conn: &mut AnyConnection, a: &AttemptRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO refresh_attempts (id, connection_id, owner, generation, outcome, detail, started_at, finished_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&a.id)
    .bind(&a.connection_id)
    .bind(&a.owner)
    .bind(a.generation)
    .bind(&a.outcome)
    .bind(&a.detail)
    .bind(a.started_at)
    .bind(a.finished_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets the detail of a finished attempt.
pub async fn set_attempt_detail(conn: &mut AnyConnection, id: &str, detail: &str) -> DbResult<()> {
    sqlx::query("UPDATE refresh_attempts SET detail = $2 WHERE id = $1")
        .bind(id)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

/// The detail of an attempt found unfinished by the next one (SQL text: no quotes in it).
const INTERRUPTED_ATTEMPT: &str =
    "the process stopped after calling the provider and before storing the result";

/// Finishes attempt `attempt_id` of connection `connection_id` with `outcome`, and marks the
/// connection's other unfinished attempts as interrupted (their process died between calling the
/// provider and storing the answer); returns how many of those there were.
pub async fn finish_attempts(
    conn: &mut AnyConnection,
    connection_id: &str,
    attempt_id: &str,
    outcome: &str,
    detail: Option<&str>,
    now_ms: i64,
) -> DbResult<u64> {
    let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE refresh_attempts SET finished_at = $5, \
         outcome = CASE WHEN id = $2 THEN $3 ELSE 'interrupted' END, \
         detail = CASE WHEN id = $2 THEN $4 ELSE '{INTERRUPTED_ATTEMPT}' END \
         WHERE connection_id = $1 AND outcome = 'started' RETURNING id"
    )))
    .bind(connection_id)
    .bind(attempt_id)
    .bind(outcome)
    .bind(detail)
    .bind(now_ms)
    .fetch_all(conn)
    .await?;
    Ok(rows.iter().filter(|(id,)| id != attempt_id).count() as u64)
}

/// A connection's refresh attempts, oldest first.
pub async fn attempts(conn: &mut AnyConnection, connection_id: &str) -> DbResult<Vec<AttemptRow>> {
    Ok(sqlx::query_as(
        "SELECT id, connection_id, owner, generation, outcome, detail, started_at, finished_at FROM refresh_attempts \
         WHERE connection_id = $1 ORDER BY id",
    )
    .bind(connection_id)
    .fetch_all(conn)
    .await?)
}

/// Clears the details of a connection's history (data deletion: they may name the account).
pub async fn scrub_events(conn: &mut AnyConnection, connection_id: &str) -> DbResult<()> {
    sqlx::query("UPDATE connection_events SET detail = NULL WHERE connection_id = $1")
        .bind(connection_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Stores refreshed tokens by compare-and-set on the token generation (`$8`), into an active
/// connection only: the statement both refresh paths run, with its arguments bound by
/// [`bind_tokens`]. A connection broken meanwhile (a health check in another process found its
/// token refused) stays broken, with no tokens that would be scheduled for refreshes it would
/// never get.
const STORE_TOKENS: &str = "UPDATE connections SET access_token_sealed = $2, access_expires_at = $3, \
    refresh_token_sealed = $4, refresh_expires_at = $5, token_generation = $6, last_refreshed_at = $7, \
    updated_at = $7, refresh_failures = 0, expiring_notified_at = NULL \
    WHERE id = $1 AND token_generation = $8 AND status = 'active'";

/// Binds `$1` to `$8` of [`STORE_TOKENS`].
fn bind_tokens<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments>,
    c: &'q ConnectionRow,
    expected_generation: i64,
) -> sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments> {
    query
        .bind(&c.id)
        .bind(&c.access_token_sealed)
        .bind(c.access_expires_at)
        .bind(&c.refresh_token_sealed)
        .bind(c.refresh_expires_at)
        .bind(c.token_generation)
        .bind(c.last_refreshed_at)
        .bind(expected_generation)
}

/// Writes refreshed tokens by compare-and-set on the token generation, then the next refresh
/// time, and gives the lease back if `owner` holds it; the caller runs it in a transaction.
/// Returns false when another writer stored newer tokens meanwhile (nothing is written then).
pub async fn store_refreshed(
    conn: &mut AnyConnection,
    c: &ConnectionRow,
    expected_generation: i64,
    owner: &str,
) -> DbResult<bool> {
    let stored: Option<(String,)> = bind_tokens(
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{STORE_TOKENS} RETURNING id"))),
        c,
        expected_generation,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if stored.is_none() {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE refresh_schedule SET next_refresh_at = $2, \
         lease_owner = CASE WHEN lease_owner = $3 THEN NULL ELSE lease_owner END, \
         lease_until = CASE WHEN lease_owner = $3 THEN NULL ELSE lease_until END WHERE connection_id = $1",
    )
    .bind(&c.id)
    .bind(stored_next_refresh(c))
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(true)
}

/// What [`start_claimed_refresh`] found.
#[derive(Debug)]
pub struct ClaimedStart {
    /// The connection as it was when the attempt was (or was not) recorded.
    pub row: ConnectionRow,
    /// Whether the attempt was recorded: the lease is `owner`'s, the connection active, due and
    /// of a provider this process serves.
    pub started: bool,
}

/// PostgreSQL: reads a connection claimed by the scheduler and, in the same statement, records
/// the start of refresh attempt `attempt_id` if the lease is still `owner`'s, the connection is
/// active and due, and of one of the kinds named in `providers` (as in [`claim_due_refreshes`]).
pub async fn start_claimed_refresh(
    conn: &mut AnyConnection,
    id: &str,
    owner: &str,
    attempt_id: &str,
    now_ms: i64,
    lease_needed_until: i64,
    providers: &str,
) -> DbResult<Option<ClaimedStart>> {
    #[derive(sqlx::FromRow)]
    struct Found {
        #[sqlx(flatten)]
        row: ConnectionRow,
        started: i64,
    }
    let found: Option<Found> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH c AS (SELECT {COLUMNS} FROM {FROM} WHERE id = $1), \
         a AS (INSERT INTO refresh_attempts (id, connection_id, owner, generation, outcome, started_at) \
           SELECT $2, id, $3, token_generation, 'started', $4 FROM c \
           WHERE lease_owner = $3 AND lease_until > $6 AND status = 'active' AND next_refresh_at <= $4 \
           AND {served} RETURNING id) \
         SELECT {COLUMNS}, (SELECT count(*) FROM a) AS started FROM c",
        served = served!("", "$5"),
    )))
    .bind(id)
    .bind(attempt_id)
    .bind(owner)
    .bind(now_ms)
    .bind(providers)
    .bind(lease_needed_until)
    .fetch_optional(conn)
    .await?;
    Ok(found.map(|f| ClaimedStart { row: f.row, started: f.started > 0 }))
}

/// PostgreSQL: the whole write of a successful refresh in one statement (one round trip, one
/// commit): the tokens by compare-and-set and the schedule as in [`store_refreshed`], the
/// attempt finished as `succeeded` and the connection's other unfinished attempts as
/// interrupted, a `refreshed` history event, and a `refresh_interrupted` event before it when
/// such attempts were found. Returns false, having written nothing, when the compare-and-set
/// fails.
pub async fn store_refreshed_with_history(
    conn: &mut AnyConnection,
    c: &ConnectionRow,
    expected_generation: i64,
    owner: &str,
    attempt_id: &str,
    interrupted_event: (&str, &str),
    refreshed_event_id: &str,
) -> DbResult<bool> {
    let sql = format!(
        "WITH u AS ({STORE_TOKENS} RETURNING id, workspace_id), \
         s AS (UPDATE refresh_schedule SET next_refresh_at = $9, \
           lease_owner = CASE WHEN lease_owner = $10 THEN NULL ELSE lease_owner END, \
           lease_until = CASE WHEN lease_owner = $10 THEN NULL ELSE lease_until END \
           WHERE connection_id = $1 AND EXISTS (SELECT 1 FROM u)), \
         f AS (UPDATE refresh_attempts SET finished_at = $7, \
           outcome = CASE WHEN id = $11 THEN 'succeeded' ELSE 'interrupted' END, \
           detail = CASE WHEN id = $11 THEN NULL ELSE '{INTERRUPTED_ATTEMPT}' END \
           WHERE connection_id = $1 AND outcome = 'started' AND EXISTS (SELECT 1 FROM u) RETURNING id), \
         i AS (INSERT INTO connection_events (id, connection_id, workspace_id, kind, detail, created_at) \
           SELECT $12, id, workspace_id, 'refresh_interrupted', $13, $7 FROM u \
           WHERE EXISTS (SELECT 1 FROM f WHERE id <> $11)), \
         e AS (INSERT INTO connection_events (id, connection_id, workspace_id, kind, detail, created_at) \
           SELECT $14, id, workspace_id, 'refreshed', NULL, $7 FROM u) \
         SELECT count(*) FROM u"
    );
    let (stored,): (i64,) = bind_tokens(sqlx::query_as(sqlx::AssertSqlSafe(sql)), c, expected_generation)
        .bind(stored_next_refresh(c))
        .bind(owner)
        .bind(attempt_id)
        .bind(interrupted_event.0)
        .bind(interrupted_event.1)
        .bind(refreshed_event_id)
        .fetch_one(conn)
        .await?;
    Ok(stored == 1)
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    /// SQLite's plan for `list` with each filter alone, and with the usual pairs: every filtered
    /// listing searches the index that fits it best, never the whole table or workspace, and
    /// reads its rows in order (no sort).
    #[tokio::test]
    async fn every_filtered_listing_searches_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let (w, l, c) = (Some("w"), Some("l"), Some("c"));
        let filter = |workspace_id, status, provider, link_id, before| ConnectionFilter {
            workspace_id,
            status,
            provider,
            link_id,
            before,
        };
        let cases = [
            (filter(w, None, None, None, None), "connections_workspace_id"),
            (filter(w, None, None, None, c), "connections_workspace_id"),
            (filter(w, Some("broken"), None, None, None), "connections_workspace_status"),
            (filter(w, Some("broken"), None, None, c), "connections_workspace_status"),
            (filter(w, None, Some("tiktok"), None, None), "connections_workspace_provider"),
            (filter(w, None, None, l, None), "connections_link_id"),
            (filter(w, None, None, l, c), "connections_link_id"),
            (filter(None, None, None, l, None), "connections_link_id"),
        ];
        let mut conn = db.read().await.unwrap();
        for (f, index) in &cases {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {}", list_sql(f))))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
            let plan: Vec<String> = rows.iter().map(|r| r.get::<String, _>(3)).collect();
            let on_connections = plan.iter().find(|p| p.contains(" connections ")).unwrap();
            assert!(
                on_connections.starts_with(&format!("SEARCH connections USING INDEX {index} ")),
                "{f:?}: {plan:?}"
            );
            assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "no sort needed: {f:?}: {plan:?}");
        }
        drop(conn);
        db.close().await;
    }

    /// A migrated database holding workspace `w` and an active TikTok connection `c` whose
    /// refresh is due at 1,000 ms, no lease held.
    async fn db_with_due_connection(dir: &tempfile::TempDir) -> crate::db::Db {
        let db = crate::db::test_sqlite_migrated(dir).await;
        let mut conn = db.writer().await.unwrap();
        sqlx::query(
            "INSERT INTO workspaces (id, name, slug, created_at, updated_at) VALUES ('w', 'W', 'w', 1, 1)",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        let row = ConnectionRow {
            id: "c".into(),
            workspace_id: "w".into(),
            link_id: None,
            provider: "tiktok".into(),
            provider_account_id: "account".into(),
            app_scoped_id: None,
            username: None,
            display_name: None,
            avatar_url: None,
            scopes: "user.info.basic".into(),
            access_token_sealed: Some("sealed".into()),
            access_expires_at: Some(90_000),
            refresh_token_sealed: Some("sealed".into()),
            refresh_expires_at: Some(900_000),
            token_generation: 1,
            status: "active".into(),
            status_reason: None,
            sandbox: 1,
            connected_at: 1,
            last_refreshed_at: None,
            reconnect_count: 0,
            created_at: 1,
            updated_at: 1,
            next_refresh_at: Some(1_000),
            lease_owner: None,
            lease_until: None,
            refresh_failures: 0,
            next_check_at: None,
            last_checked_at: None,
            expiring_notified_at: None,
        };
        insert(&mut *conn, &row).await.unwrap();
        drop(conn);
        db
    }

    /// Who holds the lease of connection `c`, and until when.
    async fn leased(conn: &mut AnyConnection) -> (Option<String>, Option<i64>) {
        let (owner, until, _) = lease_state(conn, "c").await.unwrap().unwrap();
        (owner, until)
    }

    /// The refresh lease as the scheduler, an on-demand refresh and a shutdown use it: a claim
    /// keeps others out until it runs out; giving back a claim not started (at shutdown) frees
    /// only that claim, not a lease the same process took again since for a refresh that is
    /// running; and a lease is given back only by its holder.
    #[tokio::test]
    async fn a_claim_given_back_frees_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_due_connection(&dir).await;
        let mut conn = db.writer().await.unwrap();
        let sqlite = crate::db::Backend::Sqlite;

        // Not due yet, and not of a provider this process serves (a sandbox connection, where
        // TikTok runs for real; Instagram): not claimed.
        assert!(
            claim_due_refreshes(&mut conn, sqlite, "a", 999, 60_999, 10, "tiktok:sandbox")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            claim_due_refreshes(&mut conn, sqlite, "a", 1_000, 61_000, 10, "tiktok,instagram:sandbox")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            claim_due_refreshes(&mut conn, sqlite, "a", 1_000, 61_000, 10, "instagram")
                .await
                .unwrap()
                .is_empty()
        );
        // Due: claimed by a, until 61,000.
        assert_eq!(
            claim_due_refreshes(&mut conn, sqlite, "a", 1_000, 61_000, 10, "tiktok:sandbox,instagram")
                .await
                .unwrap(),
            ["c"]
        );
        assert_eq!(leased(&mut conn).await, (Some("a".to_string()), Some(61_000)));
        // Held: b can neither claim it nor lease it.
        assert!(
            claim_due_refreshes(&mut conn, sqlite, "b", 2_000, 62_000, 10, "tiktok:sandbox")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(!try_lease(&mut conn, "c", "b", 2_000, 62_000).await.unwrap());
        // A refresh asked for in a meanwhile takes the lease again in a's name, until 63,000.
        assert!(try_lease(&mut conn, "c", "a", 3_000, 63_000).await.unwrap());

        // Shutting down, a gives back its claim of 61,000, which it never started: the lease of
        // the running refresh stays, and so does anyone else's.
        release_claim(&mut conn, "c", "a", 61_000).await.unwrap();
        assert_eq!(leased(&mut conn).await, (Some("a".to_string()), Some(63_000)));
        release_claim(&mut conn, "c", "b", 63_000).await.unwrap();
        release_lease(&mut conn, "c", "b").await.unwrap();
        assert_eq!(leased(&mut conn).await, (Some("a".to_string()), Some(63_000)));
        // The claim it names is given back, and the connection is free for b at once.
        release_claim(&mut conn, "c", "a", 63_000).await.unwrap();
        assert_eq!(leased(&mut conn).await, (None, None));
        assert_eq!(
            claim_due_refreshes(&mut conn, sqlite, "b", 4_000, 64_000, 10, "tiktok:sandbox").await.unwrap(),
            ["c"]
        );

        // b's lease runs out, and a takes it over; b's late release leaves a's lease alone.
        assert!(!try_lease(&mut conn, "c", "a", 64_000, 124_000).await.unwrap());
        assert!(try_lease(&mut conn, "c", "a", 64_001, 124_001).await.unwrap());
        release_lease(&mut conn, "c", "b").await.unwrap();
        assert_eq!(leased(&mut conn).await, (Some("a".to_string()), Some(124_001)));
        release_lease(&mut conn, "c", "a").await.unwrap();
        assert_eq!(leased(&mut conn).await, (None, None));

        // A connection that is not active is leased by nobody.
        sqlx::query("UPDATE connections SET status = 'broken' WHERE id = 'c'")
            .execute(&mut *conn)
            .await
            .unwrap();
        assert!(!try_lease(&mut conn, "c", "a", 130_000, 190_000).await.unwrap());
        drop(conn);
        db.close().await;
    }
}
