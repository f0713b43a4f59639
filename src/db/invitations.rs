//! The `member_invitations` table: invitations to join a workspace (see
//! [`crate::service::invitations`]).

use sqlx::AnyConnection;

use super::DbResult;

/// An invitation as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvitationRow {
    /// Id (UUIDv7).
    pub id: String,
    /// The workspace to join.
    pub workspace_id: String,
    /// The address as entered.
    pub email: String,
    /// Trimmed and lower-cased: the account that may accept.
    pub email_normalized: String,
    /// `owner` or `member`.
    pub role: String,
    /// SHA-256 (hex) of the link's token.
    pub token_hash: String,
    /// The user who invited.
    pub created_by: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// When the link stops working (ms).
    pub expires_at: i64,
    /// When it was accepted (ms).
    pub accepted_at: Option<i64>,
    /// The user who accepted.
    pub accepted_by: Option<String>,
    /// When it was revoked (ms): by an owner, or by a newer invitation of the same address.
    pub revoked_at: Option<i64>,
}

const COLUMNS: &str = "id, workspace_id, email, email_normalized, role, token_hash, created_by, created_at, \
    expires_at, accepted_at, accepted_by, revoked_at";

/// Inserts an invitation.
pub async fn insert(conn: &mut AnyConnection, i: &InvitationRow) -> DbResult<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO member_invitations ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    )))
    .bind(&i.id)
    .bind(&i.workspace_id)
    .bind(&i.email)
    .bind(&i.email_normalized)
    .bind(&i.role)
    .bind(&i.token_hash)
    .bind(&i.created_by)
    .bind(i.created_at)
    .bind(i.expires_at)
    .bind(i.accepted_at)
    .bind(&i.accepted_by)
    .bind(i.revoked_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// The invitation whose token hashes to `token_hash`, whatever its state.
pub async fn by_token_hash(conn: &mut AnyConnection, token_hash: &str) -> DbResult<Option<InvitationRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM member_invitations WHERE token_hash = $1"
    )))
    .bind(token_hash)
    .fetch_optional(conn)
    .await?)
}

/// A workspace's invitations that can still be accepted at `now_ms`, newest first.
pub async fn pending(
    conn: &mut AnyConnection,
    workspace_id: &str,
    now_ms: i64,
) -> DbResult<Vec<InvitationRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM member_invitations WHERE workspace_id = $1 AND accepted_at IS NULL \
         AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC, id DESC"
    )))
    .bind(workspace_id)
    .bind(now_ms)
    .fetch_all(conn)
    .await?)
}

/// Revokes the pending invitations of a workspace: one (`id`), or every one of an address
/// (`email_normalized`). Returns how many were revoked.
pub async fn revoke_pending(
    conn: &mut AnyConnection,
    workspace_id: &str,
    which: Which<'_>,
    now_ms: i64,
) -> DbResult<u64> {
    let (column, value) = match which {
        Which::Id(id) => ("id", id),
        Which::Email(email) => ("email_normalized", email),
    };
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE member_invitations SET revoked_at = $3 WHERE workspace_id = $1 AND {column} = $2 \
         AND accepted_at IS NULL AND revoked_at IS NULL"
    )))
    .bind(workspace_id)
    .bind(value)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Revokes the pending invitations `created_by` made: in one workspace (they left it, or are no
/// longer its owner), or in every one (`None`: their account was disabled). An invitation made
/// by someone who may no longer make one must not let its holder in. Returns how many.
pub async fn revoke_made_by(
    conn: &mut AnyConnection,
    created_by: &str,
    workspace_id: Option<&str>,
    now_ms: i64,
) -> DbResult<u64> {
    let done = sqlx::query(
        "UPDATE member_invitations SET revoked_at = $3 WHERE created_by = $1 \
         AND ($2 IS NULL OR workspace_id = $2) AND accepted_at IS NULL AND revoked_at IS NULL",
    )
    .bind(created_by)
    .bind(workspace_id)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Which pending invitations [`revoke_pending`] revokes.
#[derive(Debug, Clone, Copy)]
pub enum Which<'a> {
    /// The one with this id.
    Id(&'a str),
    /// Every one of this normalized address.
    Email(&'a str),
}

/// Marks an invitation accepted by `user_id`, if it can still be accepted at `now_ms`; returns
/// whether it was (exactly one acceptance wins).
pub async fn accept(conn: &mut AnyConnection, id: &str, user_id: &str, now_ms: i64) -> DbResult<bool> {
    let done = sqlx::query(
        "UPDATE member_invitations SET accepted_at = $3, accepted_by = $2 WHERE id = $1 \
         AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at > $3",
    )
    .bind(id)
    .bind(user_id)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
