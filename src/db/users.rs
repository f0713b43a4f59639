//! The `users` and `memberships` tables: dashboard operators and the workspaces they belong to.

use sqlx::AnyConnection;

use super::DbResult;

/// A user as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    /// Id (UUIDv7).
    pub id: String,
    /// The address as entered.
    pub email: String,
    /// Trimmed and lower-cased: the unique key.
    pub email_normalized: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// 1 for platform admins.
    pub is_admin: i64,
    /// When the user was disabled.
    pub disabled_at: Option<i64>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// Last password change (ms).
    pub password_changed_at: i64,
    /// Last successful sign-in (ms).
    pub last_login_at: Option<i64>,
}

const COLUMNS: &str = "id, email, email_normalized, password_hash, is_admin, disabled_at, created_at, \
    updated_at, password_changed_at, last_login_at";

/// Inserts a user.
pub async fn insert(conn: &mut AnyConnection, u: &UserRow) -> DbResult<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO users ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    )))
    .bind(&u.id)
    .bind(&u.email)
    .bind(&u.email_normalized)
    .bind(&u.password_hash)
    .bind(u.is_admin)
    .bind(u.disabled_at)
    .bind(u.created_at)
    .bind(u.updated_at)
    .bind(u.password_changed_at)
    .bind(u.last_login_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// One user by id.
pub async fn get(conn: &mut AnyConnection, id: &str) -> DbResult<Option<UserRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM users WHERE id = $1")))
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// One user by normalized email.
pub async fn get_by_email(conn: &mut AnyConnection, email_normalized: &str) -> DbResult<Option<UserRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM users WHERE email_normalized = $1"
    )))
    .bind(email_normalized)
    .fetch_optional(conn)
    .await?)
}

/// Every user, oldest first.
pub async fn list(conn: &mut AnyConnection) -> DbResult<Vec<UserRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM users ORDER BY id")))
        .fetch_all(conn)
        .await?)
}

/// Replaces the password hash.
pub async fn set_password(conn: &mut AnyConnection, id: &str, hash: &str, now_ms: i64) -> DbResult<()> {
    sqlx::query(
        "UPDATE users SET password_hash = $2, password_changed_at = $3, updated_at = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(hash)
    .bind(now_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks a user disabled (no effect if already disabled).
pub async fn disable(conn: &mut AnyConnection, id: &str, now_ms: i64) -> DbResult<()> {
    sqlx::query("UPDATE users SET disabled_at = COALESCE(disabled_at, $2), updated_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now_ms)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records a successful sign-in.
pub async fn record_login(conn: &mut AnyConnection, id: &str, now_ms: i64) -> DbResult<()> {
    sqlx::query("UPDATE users SET last_login_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now_ms)
        .execute(conn)
        .await?;
    Ok(())
}

/// A membership as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MembershipRow {
    /// The user.
    pub user_id: String,
    /// The workspace.
    pub workspace_id: String,
    /// `owner` or `member`.
    pub role: String,
    /// When the user was added (ms).
    pub created_at: i64,
}

/// Adds a user to a workspace, or changes their role there.
pub async fn upsert_membership(conn: &mut AnyConnection, m: &MembershipRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO memberships (user_id, workspace_id, role, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, workspace_id) DO UPDATE SET role = $3",
    )
    .bind(&m.user_id)
    .bind(&m.workspace_id)
    .bind(&m.role)
    .bind(m.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes a user from a workspace; returns whether they were a member.
pub async fn delete_membership(
    conn: &mut AnyConnection,
    user_id: &str,
    workspace_id: &str,
) -> DbResult<bool> {
    let done = sqlx::query("DELETE FROM memberships WHERE user_id = $1 AND workspace_id = $2")
        .bind(user_id)
        .bind(workspace_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The membership of one user in one workspace.
pub async fn membership(
    conn: &mut AnyConnection,
    user_id: &str,
    workspace_id: &str,
) -> DbResult<Option<MembershipRow>> {
    Ok(sqlx::query_as(
        "SELECT user_id, workspace_id, role, created_at FROM memberships WHERE user_id = $1 AND workspace_id = $2",
    )
    .bind(user_id)
    .bind(workspace_id)
    .fetch_optional(conn)
    .await?)
}

/// Whether user `user_id` may still make keys for `workspace_id`: enabled, and a platform admin or
/// an owner there. On PostgreSQL the user's row and membership stay locked (shared) until the
/// transaction ends, so that a removal, demotion or disabling running meanwhile waits for it (and
/// then finds what it made), or it for them (SQLite's write transactions run one at a time).
pub async fn may_make_keys_locked(
    conn: &mut AnyConnection,
    backend: super::Backend,
    user_id: &str,
    workspace_id: Option<&str>,
) -> DbResult<bool> {
    let lock = if backend == super::Backend::Postgres { " FOR SHARE" } else { "" };
    let user: Option<(i64, Option<i64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT is_admin, disabled_at FROM users WHERE id = $1{lock}"
    )))
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((is_admin, None)) = user else {
        return Ok(false);
    };
    if is_admin == 1 {
        return Ok(true);
    }
    let Some(workspace_id) = workspace_id else {
        return Ok(false);
    };
    let role: Option<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT role FROM memberships WHERE user_id = $1 AND workspace_id = $2{lock}"
    )))
    .bind(user_id)
    .bind(workspace_id)
    .fetch_optional(conn)
    .await?;
    Ok(role.is_some_and(|(r,)| r == "owner"))
}

/// The memberships of one user, in workspace order.
pub async fn memberships_of_user(conn: &mut AnyConnection, user_id: &str) -> DbResult<Vec<MembershipRow>> {
    Ok(sqlx::query_as(
        "SELECT user_id, workspace_id, role, created_at FROM memberships WHERE user_id = $1 ORDER BY workspace_id",
    )
    .bind(user_id)
    .fetch_all(conn)
    .await?)
}

/// A member of a workspace, with the user's email.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MemberRow {
    /// The user.
    pub user_id: String,
    /// The user's email.
    pub email: String,
    /// `owner` or `member`.
    pub role: String,
    /// When the user was added (ms).
    pub created_at: i64,
    /// When the user was disabled.
    pub disabled_at: Option<i64>,
}

/// The members of a workspace, oldest membership first.
pub async fn members_of_workspace(conn: &mut AnyConnection, workspace_id: &str) -> DbResult<Vec<MemberRow>> {
    Ok(sqlx::query_as(
        "SELECT m.user_id, u.email, m.role, m.created_at, u.disabled_at FROM memberships m \
         JOIN users u ON u.id = m.user_id WHERE m.workspace_id = $1 ORDER BY m.created_at, m.user_id",
    )
    .bind(workspace_id)
    .fetch_all(conn)
    .await?)
}

/// Whether `user_id`, an owner of the workspace, is its last owner who can sign in: enabled, and
/// no other enabled owner. (A disabled owner is no owner to leave the workspace to, and may
/// itself be removed or made a member whatever the others.)
pub async fn is_last_usable_owner(
    conn: &mut AnyConnection,
    workspace_id: &str,
    user_id: &str,
) -> DbResult<bool> {
    let (others, enabled): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM memberships m JOIN users u ON u.id = m.user_id \
             WHERE m.workspace_id = $1 AND m.role = 'owner' AND u.disabled_at IS NULL AND m.user_id <> $2), \
           (SELECT COUNT(*) FROM users WHERE id = $2 AND disabled_at IS NULL)",
    )
    .bind(workspace_id)
    .bind(user_id)
    .fetch_one(conn)
    .await?;
    Ok(enabled == 1 && others == 0)
}

/// A workspace a user belongs to, for the workspace switcher.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserWorkspaceRow {
    /// Workspace id.
    pub id: String,
    /// Workspace name.
    pub name: String,
    /// Workspace slug.
    pub slug: String,
    /// The user's role there.
    pub role: String,
}

/// The workspaces a user belongs to, by name.
pub async fn workspaces_of_user(conn: &mut AnyConnection, user_id: &str) -> DbResult<Vec<UserWorkspaceRow>> {
    Ok(sqlx::query_as(
        "SELECT w.id, w.name, w.slug, m.role FROM memberships m JOIN workspaces w ON w.id = m.workspace_id \
         WHERE m.user_id = $1 ORDER BY w.name, w.id",
    )
    .bind(user_id)
    .fetch_all(conn)
    .await?)
}
