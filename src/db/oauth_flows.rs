//! The `oauth_flows` table: one row per started OAuth flow (state, PKCE verifier, browser
//! binding), consumed on first use.

use std::sync::LazyLock;

use sqlx::AnyConnection;

use super::DbResult;
use super::stmt::{Arg, Exec, Stmt, from_lite, stmt};

/// A flow as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FlowRow {
    /// Id (UUIDv7); also the path of the result page.
    pub id: String,
    /// SHA-256 hex of the OAuth `state`.
    pub state_hash: String,
    /// SHA-256 hex of the browser-binding cookie.
    pub browser_hash: String,
    /// The link the flow started from.
    pub link_id: String,
    /// The link's workspace.
    pub workspace_id: String,
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// The PKCE verifier, sealed for `oauth_flows/<id>/verifier`; empty for a provider without
    /// PKCE, and once erased (the attempt ended).
    pub verifier_sealed: String,
    /// Start (ms).
    pub created_at: i64,
    /// Ten minutes after the start (ms).
    pub expires_at: i64,
    /// When the callback consumed it.
    pub consumed_at: Option<i64>,
    /// How it ended.
    pub outcome: Option<String>,
    /// The connection it produced.
    pub connection_id: Option<String>,
    /// What went wrong, in words the client's page and the agency's listing show: the scopes
    /// switched off, the error the provider sent back. Never a secret.
    pub detail: Option<String>,
    /// The SHA-256 hex of the link's token the flow was started with (its URL then, the hash
    /// the link is looked up by): a rotation since, which changes it, ends the flow. `None` for
    /// flows started before it was recorded.
    pub link_token_hash: Option<String>,
}

impl FlowRow {
    /// How the flow was started from its link.
    pub fn start(&self) -> super::links::Start<'_> {
        super::links::Start { at_ms: self.created_at, token_hash: self.link_token_hash.as_deref() }
    }
}

from_lite!(FlowRow {
    id,
    state_hash,
    browser_hash,
    link_id,
    workspace_id,
    provider,
    verifier_sealed,
    created_at,
    expires_at,
    consumed_at,
    outcome,
    connection_id,
    detail,
    link_token_hash
});

const COLUMNS: &str = "id, state_hash, browser_hash, link_id, workspace_id, provider, verifier_sealed, \
    created_at, expires_at, consumed_at, outcome, connection_id, detail, link_token_hash";

/// Inserts a flow, whatever its link has open.
#[cfg(test)]
pub async fn insert(conn: &mut impl Exec, f: &FlowRow) -> DbResult<()> {
    const SQL: &str = "INSERT INTO oauth_flows (id, state_hash, browser_hash, link_id, workspace_id, provider, \
        verifier_sealed, created_at, expires_at, consumed_at, outcome, connection_id, detail, link_token_hash) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";
    conn.execute(&Stmt::new(SQL, values(f))).await?;
    Ok(())
}

/// Inserts a flow unless its link has `open_limit` attempts open already (not back from the
/// provider, not expired when this one starts, and started with the link's URL this one was
/// started with: a rotation frees the places of attempts the old URL started, which can no longer
/// connect); whether it was inserted. One statement: exact on SQLite, whose writes run one at a
/// time; on PostgreSQL, starts committed at the same moment may each count the others out, so a
/// link may exceed the limit by the starts running at once.
pub async fn insert_bounded(conn: &mut impl Exec, f: &FlowRow, open_limit: i64) -> DbResult<bool> {
    // `oauth_flows_open` holds only attempts not yet claimed, by link and expiry. Attempts of an
    // earlier version recorded no URL: they count.
    const SQL: &str = "INSERT INTO oauth_flows (id, state_hash, browser_hash, link_id, workspace_id, provider, \
        verifier_sealed, created_at, expires_at, consumed_at, outcome, connection_id, detail, link_token_hash) \
        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 \
        WHERE (SELECT COUNT(*) FROM (SELECT 1 FROM oauth_flows \
            WHERE link_id = $4 AND consumed_at IS NULL AND expires_at > $8 \
            AND (link_token_hash = $14 OR link_token_hash IS NULL) LIMIT $15) AS open_attempts) < $15";
    let mut args = values(f);
    args.push(Arg::from(open_limit));
    Ok(conn.execute(&Stmt::new(SQL, args)).await? == 1)
}

/// A flow's columns as the inserts' `$1`–`$14`.
fn values(f: &FlowRow) -> Vec<Arg<'_>> {
    vec![
        Arg::from(&f.id),
        Arg::from(&f.state_hash),
        Arg::from(&f.browser_hash),
        Arg::from(&f.link_id),
        Arg::from(&f.workspace_id),
        Arg::from(&f.provider),
        Arg::from(&f.verifier_sealed),
        Arg::from(f.created_at),
        Arg::from(f.expires_at),
        Arg::from(f.consumed_at),
        Arg::from(&f.outcome),
        Arg::from(&f.connection_id),
        Arg::from(&f.detail),
        Arg::from(&f.link_token_hash),
    ]
}

/// The flow whose state hashes to `state_hash`.
pub async fn get_by_state_hash(conn: &mut AnyConnection, state_hash: &str) -> DbResult<Option<FlowRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM oauth_flows WHERE state_hash = $1"
    )))
    .bind(state_hash)
    .fetch_optional(conn)
    .await?)
}

/// One flow by id.
pub async fn get(conn: &mut impl Exec, id: &str) -> DbResult<Option<FlowRow>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {COLUMNS} FROM oauth_flows WHERE id = $1"));
    conn.fetch_optional(&stmt!(&SQL, id)).await
}

/// Consumes the flow whose state hashes to `state_hash`, if it is unused, unexpired, of
/// `provider` and started by the browser whose cookie hashes to `browser_hash`: one statement,
/// which returns the flow to exactly one caller. `None` for everything else; the caller reads the
/// flow to tell which check failed.
pub async fn claim(
    conn: &mut impl Exec,
    state_hash: &str,
    browser_hash: &str,
    provider: &str,
    now_ms: i64,
) -> DbResult<Option<FlowRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE oauth_flows SET consumed_at = $4 WHERE state_hash = $1 AND browser_hash = $2 \
             AND provider = $3 AND consumed_at IS NULL AND expires_at > $4 RETURNING {COLUMNS}"
        )
    });
    conn.fetch_optional(&stmt!(&SQL, state_hash, browser_hash, provider, now_ms)).await
}

/// Records how a flow ended, and erases its PKCE verifier, which nothing needs any more (an
/// empty sealed value is an erased one). The first outcome recorded stays.
pub async fn finish(
    conn: &mut impl Exec,
    id: &str,
    outcome: &str,
    connection_id: Option<&str>,
    detail: Option<&str>,
) -> DbResult<()> {
    let s = stmt!(
        "UPDATE oauth_flows SET outcome = $2, connection_id = $3, detail = $4, verifier_sealed = '' \
         WHERE id = $1 AND outcome IS NULL",
        id,
        outcome,
        connection_id,
        detail
    );
    conn.execute(&s).await?;
    Ok(())
}

/// The attempts of a link, newest first (ids are UUIDv7, in the order they were made): at
/// most `limit`, those older than the attempt `before` when given.
pub async fn of_link(
    conn: &mut AnyConnection,
    link_id: &str,
    before: Option<&str>,
    limit: i64,
) -> DbResult<Vec<FlowRow>> {
    let older = if before.is_some() { "AND id < $3" } else { "" };
    let sql =
        format!("SELECT {COLUMNS} FROM oauth_flows WHERE link_id = $1 {older} ORDER BY id DESC LIMIT $2");
    let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(link_id).bind(limit);
    if let Some(before) = before {
        q = q.bind(before);
    }
    Ok(q.fetch_all(conn).await?)
}

/// How long an attempt is kept after it expired: its result page, and the agency's record of
/// it (a client says "it did not work last week").
pub const RETENTION_MS: i64 = 30 * 86_400_000;

/// Deletes flows that expired more than [`RETENTION_MS`] ago.
pub async fn purge_expired(conn: &mut AnyConnection, now_ms: i64) -> DbResult<u64> {
    // An expired attempt's PKCE verifier is of no use any more (no callback claims it now): erased
    // at once, whether or not its outcome was recorded.
    sqlx::query(
        "UPDATE oauth_flows SET verifier_sealed = '' WHERE expires_at < $1 AND verifier_sealed <> ''",
    )
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    let done = sqlx::query("DELETE FROM oauth_flows WHERE expires_at < $1")
        .bind(now_ms - RETENTION_MS)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// [`insert_bounded`] as a [`FlowWrite`](super::FlowWrite).
#[derive(Debug)]
pub struct Insert {
    /// The flow.
    pub flow: FlowRow,
    /// How many attempts its link may have open.
    pub open_limit: i64,
}

impl super::FlowWrite for Insert {
    type Output = bool;
    type Error = super::DbError;

    const ONE_STATEMENT: bool = true;

    async fn run<E: Exec>(self, conn: &mut E) -> DbResult<bool> {
        insert_bounded(conn, &self.flow, self.open_limit).await
    }
}

/// [`claim`] as a [`FlowWrite`](super::FlowWrite).
#[derive(Debug)]
pub struct Claim {
    /// SHA-256 hex of the `state` the callback brought.
    pub state_hash: String,
    /// SHA-256 hex of the browser cookie it brought.
    pub browser_hash: String,
    /// The callback's provider.
    pub provider: &'static str,
    /// Now (ms).
    pub now_ms: i64,
}

impl super::FlowWrite for Claim {
    type Output = Option<FlowRow>;
    type Error = super::DbError;

    const ONE_STATEMENT: bool = true;

    async fn run<E: Exec>(self, conn: &mut E) -> DbResult<Option<FlowRow>> {
        claim(conn, &self.state_hash, &self.browser_hash, self.provider, self.now_ms).await
    }
}

/// [`finish`] (without a connection) as a [`FlowWrite`](super::FlowWrite).
#[derive(Debug)]
pub struct Finish {
    /// The flow.
    pub id: String,
    /// How it ended.
    pub outcome: &'static str,
    /// What went wrong (see [`FlowRow::detail`]).
    pub detail: Option<String>,
}

impl super::FlowWrite for Finish {
    type Output = ();
    type Error = super::DbError;

    const ONE_STATEMENT: bool = true;

    async fn run<E: Exec>(self, conn: &mut E) -> DbResult<()> {
        finish(conn, &self.id, self.outcome, None, self.detail.as_deref()).await
    }
}
