//! Dashboard operators: users, their passwords, workspace memberships, sessions and the sign-in
//! throttle.
//!
//! - **Passwords** are hashed with argon2id, m = 19456 KiB, t = 2, p = 1, a 16-byte random salt,
//!   stored as a PHC string (the OWASP floor that security.md asks for). Hashing runs on the
//!   blocking pool, at most [`MAX_CONCURRENT_HASHES`] at a time, so that a burst of sign-ins
//!   neither stalls the async workers nor takes unbounded memory.
//! - **Sessions** live in the database: the browser holds a random 256-bit token in an HttpOnly
//!   cookie, the database only its SHA-256. A session ends after [`SESSION_IDLE_MS`] without a
//!   request or [`SESSION_ABSOLUTE_MS`] after sign-in, whichever comes first; on sign-out; when
//!   the user is disabled; and (all of the user's, the browser that changed it getting a new one)
//!   when the password changes. Every sign-in makes a new session, so a token planted before
//!   sign-in is worthless.
//! - **Throttle**: failed sign-ins are stored (account as a hash of the email, and the client
//!   address, an IPv6 one by its /64), so limits survive restarts and hold across instances: at
//!   most [`MAX_FAILURES_PER_ACCOUNT`] per account and [`MAX_FAILURES_PER_IP`] per address within
//!   [`THROTTLE_WINDOW_MS`]. The answer never says whether an account exists: an unknown email
//!   is verified against a dummy hash, so that both cases cost one argon2 verification.
//! - **Trusted browsers**: a successful sign-in also gives the browser a cookie of its own
//!   (random, stored as SHA-256, trusted for [`DEVICE_TRUST_MS`] after its last sign-in). A
//!   sign-in to that account from that browser counts its failures against the browser, not the
//!   account (OWASP's "device cookies"): someone failing on purpose from elsewhere locks the
//!   account for other browsers only, never for the ones its owner signed in from. The address
//!   limit applies to every attempt.
//! - **Roles**: a platform admin sees every workspace; other users see the workspaces they are a
//!   member of, as `owner` (may also manage members, branding and API keys) or `member`.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use time::OffsetDateTime;

use super::{Actor, ServiceError, ServiceResult, api_keys, audit};
use crate::clock::from_millis;
use crate::crypto;
use crate::db::sessions::SessionRow;
use crate::db::users::{MembershipRow, UserRow};
use crate::db::{self, DbError, new_id};
use crate::domain::FieldError;
use crate::state::App;

/// A session ends after this long without a request (30 minutes).
pub const SESSION_IDLE_MS: i64 = 30 * 60 * 1000;
/// A session ends this long after sign-in, however active (12 hours).
pub const SESSION_ABSOLUTE_MS: i64 = 12 * 60 * 60 * 1000;
/// The sliding window of the sign-in throttle (15 minutes).
pub const THROTTLE_WINDOW_MS: i64 = 15 * 60 * 1000;
/// Most failed sign-ins per account within the window.
pub const MAX_FAILURES_PER_ACCOUNT: i64 = 10;
/// Most failed sign-ins per client address within the window.
pub const MAX_FAILURES_PER_IP: i64 = 50;
/// How long a browser stays trusted after its last sign-in (90 days).
pub const DEVICE_TRUST_MS: i64 = 90 * 24 * 60 * 60 * 1000;
/// Most trusted browsers kept per user (the most recently used).
pub const MAX_DEVICES_PER_USER: i64 = 20;
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted (argon2 takes any length; this bounds the work per request).
pub const MAX_PASSWORD_CHARS: usize = 256;
/// Most argon2 computations running at once (each takes 19 MiB).
pub const MAX_CONCURRENT_HASHES: usize = 4;

/// argon2id with the OWASP parameters: m = 19456 KiB, t = 2, p = 1.
fn argon2() -> ServiceResult<Argon2<'static>> {
    let params = Params::new(19_456, 2, 1, None)
        .map_err(|e| ServiceError::Unavailable(format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password into a PHC string (blocking: call through [`hash_password_async`] from
/// async code).
pub fn hash_password(password: &str) -> ServiceResult<String> {
    let salt = SaltString::encode_b64(&crypto::random_bytes::<16>())
        .map_err(|e| ServiceError::Unavailable(format!("salt: {e}")))?;
    let hash = argon2()?
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| ServiceError::Unavailable(format!("password hashing failed: {e}")))?;
    Ok(hash.to_string())
}

/// Checks a password against a PHC string (blocking). A malformed hash never matches.
pub fn verify_password(phc: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else { return false };
    let Ok(a) = argon2() else { return false };
    a.verify_password(password.as_bytes(), &parsed).is_ok()
}

fn hashing_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| tokio::sync::Semaphore::new(MAX_CONCURRENT_HASHES))
}

/// Runs `f` on the blocking pool, at most [`MAX_CONCURRENT_HASHES`] at once.
async fn with_hash_permit<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ServiceResult<T> {
    let _permit = hashing_permits()
        .acquire()
        .await
        .map_err(|_| ServiceError::Unavailable("password hashing is shutting down".into()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ServiceError::Unavailable("password hashing task failed".into()))
}

/// [`hash_password`] on the blocking pool.
pub async fn hash_password_async(password: &SecretString) -> ServiceResult<String> {
    let password = password.clone();
    with_hash_permit(move || hash_password(password.expose_secret())).await?
}

/// The hash of a random password nobody knows (generated once, with the same parameters),
/// verified against when the email is unknown so that an unknown account costs the same argon2
/// work as a known one. A constant, so that even the first unknown email costs no extra hash.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$gqojAVvWOa+8aAp36alteA$1QtXFNWmV1muIdHYinemPup1Vnj8HJdJmGpu/DCsaqQ";

/// [`verify_password`] on the blocking pool; `None` verifies against the dummy hash (and fails).
async fn verify_password_async(phc: Option<String>, password: &SecretString) -> ServiceResult<bool> {
    let password = password.clone();
    with_hash_permit(move || match phc {
        Some(phc) => verify_password(&phc, password.expose_secret()),
        None => {
            let _ = verify_password(DUMMY_HASH, password.expose_secret());
            false
        }
    })
    .await
}

/// Trims and lower-cases an email address and checks its shape.
pub fn normalize_email(value: &str) -> Result<String, FieldError> {
    let v = value.trim().to_lowercase();
    let err = || FieldError::new("email", "must be an email address like name@example.com");
    if v.len() > 254 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err());
    }
    let (local, domain) = v.rsplit_once('@').ok_or_else(err)?;
    if local.is_empty() || local.len() > 64 || domain.is_empty() || domain.starts_with('.') {
        return Err(err());
    }
    Ok(v)
}

/// Checks a new password: length, and not the email address itself.
pub fn validate_password(field: &str, password: &str, email_normalized: &str) -> Result<(), FieldError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(FieldError::new(field, format!("must be at least {MIN_PASSWORD_CHARS} characters")));
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(FieldError::new(field, format!("must be at most {MAX_PASSWORD_CHARS} characters")));
    }
    if password.trim().to_lowercase() == email_normalized {
        return Err(FieldError::new(field, "must not be your email address"));
    }
    Ok(())
}

/// A user's role in one workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages the workspace: members, branding, API keys, and everything a member does.
    Owner,
    /// Creates links and watches connections.
    Member,
}

impl Role {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }

    /// Parses the stored or submitted form.
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        match s.trim() {
            "owner" => Ok(Role::Owner),
            "member" => Ok(Role::Member),
            _ => Err(FieldError::new("role", "must be owner or member")),
        }
    }
}

/// A user's membership, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct MembershipView {
    /// Workspace id.
    pub workspace_id: String,
    /// Workspace slug.
    pub slug: String,
    /// Workspace name.
    pub name: String,
    /// `owner` or `member`.
    pub role: String,
}

/// A user as the CLI and the dashboard show it (never the password hash).
#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    /// Id.
    pub id: String,
    /// Email address.
    pub email: String,
    /// Platform admin (every workspace).
    pub admin: bool,
    /// Disabled users cannot sign in.
    pub disabled: bool,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last successful sign-in.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_login_at: Option<OffsetDateTime>,
    /// Workspaces the user belongs to.
    pub workspaces: Vec<MembershipView>,
}

fn view(u: &UserRow, workspaces: Vec<MembershipView>) -> UserView {
    UserView {
        id: u.id.clone(),
        email: u.email.clone(),
        admin: u.is_admin != 0,
        disabled: u.disabled_at.is_some(),
        created_at: from_millis(u.created_at),
        last_login_at: u.last_login_at.map(from_millis),
        workspaces,
    }
}

/// The view of a user, with the workspaces they belong to.
pub async fn view_of(app: &App, u: &UserRow) -> ServiceResult<UserView> {
    let mut conn = app.db.read().await?;
    let ws = db::users::workspaces_of_user(&mut conn, &u.id)
        .await?
        .into_iter()
        .map(|w| MembershipView { workspace_id: w.id, slug: w.slug, name: w.name, role: w.role })
        .collect();
    Ok(view(u, ws))
}

/// Creates a user. The password is checked and hashed here; it is never logged.
pub async fn create(
    app: &App,
    actor: &Actor,
    email: &str,
    password: &SecretString,
    admin: bool,
) -> ServiceResult<UserView> {
    let normalized = normalize_email(email)?;
    validate_password("password", password.expose_secret(), &normalized)?;
    let hash = hash_password_async(password).await?;
    let row = insert_user(app, actor, email.trim(), &normalized, hash, admin).await?;
    view_of(app, &row).await
}

async fn insert_user(
    app: &App,
    actor: &Actor,
    email: &str,
    normalized: &str,
    hash: String,
    admin: bool,
) -> ServiceResult<UserRow> {
    let now = app.now_ms();
    let row = UserRow {
        id: new_id(),
        email: email.to_string(),
        email_normalized: normalized.to_string(),
        password_hash: hash,
        is_admin: i64::from(admin),
        disabled_at: None,
        created_at: now,
        updated_at: now,
        password_changed_at: now,
        last_login_at: None,
    };
    let mut tx = app.db.begin_write().await?;
    match db::users::insert(&mut tx, &row).await {
        Err(DbError::Conflict(_)) => {
            return Err(FieldError::new("email", "an account with this email already exists").into());
        }
        other => other?,
    }
    audit::record(
        &mut tx,
        now,
        actor,
        None,
        "user.created",
        "user",
        &row.id,
        serde_json::json!({"email": row.email, "admin": admin}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %row.id, admin, "user created");
    Ok(row)
}

/// Every user, oldest first.
pub async fn list(app: &App) -> ServiceResult<Vec<UserView>> {
    let rows = {
        let mut conn = app.db.read().await?;
        db::users::list(&mut conn).await?
    };
    let mut out = Vec::with_capacity(rows.len());
    for u in &rows {
        out.push(view_of(app, u).await?);
    }
    Ok(out)
}

/// One user by email.
pub async fn get_by_email(app: &App, email: &str) -> ServiceResult<UserRow> {
    let normalized = normalize_email(email)?;
    let mut conn = app.db.read().await?;
    db::users::get_by_email(&mut conn, &normalized).await?.ok_or(ServiceError::NotFound("user"))
}

/// One user by id.
pub async fn get(app: &App, id: &str) -> ServiceResult<UserRow> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("user"));
    }
    let mut conn = app.db.read().await?;
    db::users::get(&mut conn, id).await?.ok_or(ServiceError::NotFound("user"))
}

/// Disables a user: they cannot sign in any more and every session of theirs ends now.
pub async fn disable(app: &App, actor: &Actor, email: &str) -> ServiceResult<UserView> {
    let mut user = get_by_email(app, email).await?;
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    db::users::disable(&mut tx, &user.id, now).await?;
    let ended = db::sessions::delete_for_user(&mut tx, &user.id, None).await?;
    db::sessions::delete_devices(&mut tx, &user.id).await?;
    let withdrawn = db::invitations::revoke_made_by(&mut tx, &user.id, None, now).await?;
    let keys =
        api_keys::revoke_made_by(&mut tx, now, actor, &maker(&user.id), None, "its maker was disabled")
            .await?;
    audit::record(
        &mut tx,
        now,
        actor,
        None,
        "user.disabled",
        "user",
        &user.id,
        serde_json::json!({"sessions_ended": ended, "invitations_revoked": withdrawn, "api_keys_revoked": keys}),
    )
    .await?;
    tx.commit().await?;
    user.disabled_at = user.disabled_at.or(Some(now));
    tracing::info!(user_id = %user.id, sessions_ended = ended, "user disabled");
    view_of(app, &user).await
}

/// Sets a new password for a user (operator recovery from the CLI); ends every session.
pub async fn reset_password(
    app: &App,
    actor: &Actor,
    email: &str,
    password: &SecretString,
) -> ServiceResult<UserView> {
    let user = get_by_email(app, email).await?;
    validate_password("password", password.expose_secret(), &user.email_normalized)?;
    let hash = hash_password_async(password).await?;
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    db::users::set_password(&mut tx, &user.id, &hash, now).await?;
    let ended = db::sessions::delete_for_user(&mut tx, &user.id, None).await?;
    // A reset is how an operator takes an account back: nobody's browser stays trusted.
    db::sessions::delete_devices(&mut tx, &user.id).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        None,
        "user.password_reset",
        "user",
        &user.id,
        serde_json::json!({"sessions_ended": ended}),
    )
    .await?;
    tx.commit().await?;
    view_of(app, &user).await
}

/// Input of [`change_password`].
#[derive(Debug)]
pub struct PasswordChange {
    /// The current password.
    pub current: SecretString,
    /// The new password.
    pub new: SecretString,
    /// The new password again.
    pub confirm: SecretString,
}

/// Changes the signed-in user's own password. The current password is required (wrong guesses
/// are throttled per session, and per address, like sign-ins: someone failing to sign in to the
/// account elsewhere does not stop its owner from changing the password); every session of the
/// user ends, and the browser that changed it gets a new one (returned, for its cookie).
pub async fn change_password(
    app: &App,
    user: &UserRow,
    session_id: &str,
    ip: &str,
    input: &PasswordChange,
) -> ServiceResult<NewSession> {
    let throttle_key = format!("session:{session_id}");
    let now = app.now_ms();
    let Some(attempt) = reserve_attempt(app, &throttle_key, ip, now).await? else {
        return Err(FieldError::new(
            "current_password",
            "too many wrong attempts; wait 15 minutes and try again",
        )
        .into());
    };
    if !verify_password_async(Some(user.password_hash.clone()), &input.current).await? {
        return Err(FieldError::new("current_password", "is not your current password").into());
    }
    // The right password: the attempt was not a failure.
    db::sessions::delete_failure(&mut *app.db.writer().await?, &attempt).await?;
    let mut errors = super::Errors::default();
    errors.take(validate_password("new_password", input.new.expose_secret(), &user.email_normalized));
    if input.new.expose_secret() != input.confirm.expose_secret() {
        errors.push(FieldError::new("confirm_password", "does not match the new password"));
    }
    errors.finish()?;
    let hash = hash_password_async(&input.new).await?;
    let now = app.now_ms();
    let (token, session) = session_row(&user.id, ip, now);
    let (device_token, device) = device_row(&user.id, now);
    let mut tx = app.db.begin_write().await?;
    db::users::set_password(&mut tx, &user.id, &hash, now).await?;
    // Every session ends, this one too: its token may be what someone else holds (the reason to
    // change a password), and proving the password again earns a new one (ASVS 7.2.4). So does
    // the trust of every browser, as with a reset; this one is trusted anew.
    let ended = db::sessions::delete_for_user(&mut tx, &user.id, None).await?.saturating_sub(1);
    db::sessions::insert(&mut tx, &session).await?;
    db::sessions::delete_devices(&mut tx, &user.id).await?;
    db::sessions::insert_device(&mut tx, &device, MAX_DEVICES_PER_USER).await?;
    audit::record(
        &mut tx,
        now,
        &Actor::User { id: user.id.clone() },
        None,
        "user.password_changed",
        "user",
        &user.id,
        serde_json::json!({"other_sessions_ended": ended}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %user.id, session_id = %session.id, "password changed; a new session replaces this one");
    Ok(NewSession {
        token: SecretString::from(token),
        session,
        user: user.clone(),
        device: Some(SecretString::from(device_token)),
    })
}

/// A member of a workspace, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    /// The user.
    pub user_id: String,
    /// The user's email.
    pub email: String,
    /// `owner` or `member`.
    pub role: String,
    /// Whether the user is disabled.
    pub disabled: bool,
    /// Since when.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// The members of a workspace (the caller has checked that it may see them).
pub async fn members(app: &App, workspace_id: &str) -> ServiceResult<Vec<MemberView>> {
    let mut conn = app.db.read().await?;
    Ok(db::users::members_of_workspace(&mut conn, workspace_id)
        .await?
        .into_iter()
        .map(|m| MemberView {
            user_id: m.user_id,
            email: m.email,
            role: m.role,
            disabled: m.disabled_at.is_some(),
            since: from_millis(m.created_at),
        })
        .collect())
}

/// Adds the account that uses `email` to a workspace, or changes its role there (the operator's
/// `user add-member`; in the dashboard, owners invite: see [`super::invitations`]). The caller
/// has checked that the actor may manage the workspace's members.
pub async fn add_member(
    app: &App,
    actor: &Actor,
    workspace_id: &str,
    email: &str,
    role: &str,
) -> ServiceResult<MemberView> {
    let mut errors = super::Errors::default();
    let normalized = errors.take(normalize_email(email));
    let role = errors.take(Role::parse(role));
    errors.finish()?;
    let (Some(normalized), Some(role)) = (normalized, role) else {
        return Err(FieldError::new("email", "is invalid").into());
    };
    let user = {
        let mut conn = app.db.read().await?;
        if db::workspaces::get(&mut conn, workspace_id).await?.is_none() {
            return Err(ServiceError::NotFound("workspace"));
        }
        db::users::get_by_email(&mut conn, &normalized).await?
    };
    let Some(user) = user else {
        return Err(FieldError::new(
            "email",
            "no account uses this email; create it first (`authlink user create`)",
        )
        .into());
    };
    let now = app.now_ms();
    let membership = MembershipRow {
        user_id: user.id.clone(),
        workspace_id: workspace_id.to_string(),
        role: role.as_str().to_string(),
        created_at: now,
    };
    let mut tx = app.db.begin_write().await?;
    // One change of a workspace's members at a time, so that two owners demoting or removing
    // each other cannot both pass the only-owner check.
    db::advisory_lock(&mut tx, app.db.backend(), &members_lock(workspace_id)).await?;
    still_entitled(&mut tx, app, actor, workspace_id).await?;
    let before = db::users::membership(&mut tx, &user.id, workspace_id).await?;
    if before.as_ref().is_some_and(|b| b.role == "owner")
        && role == Role::Member
        && db::users::is_last_usable_owner(&mut tx, workspace_id, &user.id).await?
    {
        return Err(FieldError::new(
            "role",
            "this is the workspace's only owner; make someone else owner first",
        )
        .into());
    }
    db::users::upsert_membership(&mut tx, &membership).await?;
    // An owner made a member may no longer invite nor hold API keys: the invitations they sent
    // are withdrawn, the keys they made revoked.
    let (withdrawn, keys) = if before.as_ref().is_some_and(|b| b.role == "owner") && role == Role::Member {
        let w = db::invitations::revoke_made_by(&mut tx, &user.id, Some(workspace_id), now).await?;
        let because = "its maker is no longer an owner of the workspace";
        (
            w,
            api_keys::revoke_made_by(&mut tx, now, actor, &maker(&user.id), Some(workspace_id), because)
                .await?,
        )
    } else {
        (0, 0)
    };
    audit::record(
        &mut tx,
        now,
        actor,
        Some(workspace_id),
        if before.is_some() { "member.role_changed" } else { "member.added" },
        "user",
        &user.id,
        serde_json::json!({
            "email": user.email,
            "role": role.as_str(),
            "invitations_revoked": withdrawn,
            "api_keys_revoked": keys,
        }),
    )
    .await?;
    tx.commit().await?;
    let since = before.map(|b| b.created_at).unwrap_or(now);
    Ok(MemberView {
        user_id: user.id,
        email: user.email,
        role: role.as_str().into(),
        disabled: user.disabled_at.is_some(),
        since: from_millis(since),
    })
}

/// Refuses a user who is no longer an owner of `workspace_id` (nor a platform admin), checked in
/// `tx` under the members lock: a request let in before its maker was removed, made a member or
/// disabled must not change the members after that change (the other actors are not users).
pub(crate) async fn still_entitled(
    tx: &mut sqlx::AnyConnection,
    app: &App,
    actor: &Actor,
    workspace_id: &str,
) -> ServiceResult<()> {
    let Actor::User { id } = actor else {
        return Ok(());
    };
    if db::users::may_make_keys_locked(tx, app.db.backend(), id, Some(workspace_id)).await? {
        Ok(())
    } else {
        Err(ServiceError::Forbidden("the right to manage this workspace's members was withdrawn meanwhile"))
    }
}

/// The advisory lock (PostgreSQL) under which a workspace's members change.
pub(crate) fn members_lock(workspace_id: &str) -> String {
    format!("members:{workspace_id}")
}

/// The `created_by` value of what a user made.
fn maker(user_id: &str) -> String {
    Actor::User { id: user_id.to_string() }.label()
}

/// Removes a user from a workspace, revoking the API keys they made there (and the keys those
/// made). The last owner cannot be removed.
pub async fn remove_member(app: &App, actor: &Actor, workspace_id: &str, user_id: &str) -> ServiceResult<()> {
    if !db::is_id(user_id) {
        return Err(ServiceError::NotFound("member"));
    }
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    db::advisory_lock(&mut tx, app.db.backend(), &members_lock(workspace_id)).await?;
    let Some(m) = db::users::membership(&mut tx, user_id, workspace_id).await? else {
        return Err(ServiceError::NotFound("member"));
    };
    if m.role == "owner" && db::users::is_last_usable_owner(&mut tx, workspace_id, user_id).await? {
        return Err(ServiceError::Conflict(
            "this is the workspace's only owner; make someone else owner first".into(),
        ));
    }
    db::users::delete_membership(&mut tx, user_id, workspace_id).await?;
    let withdrawn = db::invitations::revoke_made_by(&mut tx, user_id, Some(workspace_id), now).await?;
    let because = "its maker was removed from the workspace";
    let keys =
        api_keys::revoke_made_by(&mut tx, now, actor, &maker(user_id), Some(workspace_id), because).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(workspace_id),
        "member.removed",
        "user",
        user_id,
        serde_json::json!({"role": m.role, "invitations_revoked": withdrawn, "api_keys_revoked": keys}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The role of a user in a workspace: `None` when the user may not see it. Platform admins are
/// treated as owners everywhere.
pub async fn role_in(app: &App, user: &UserRow, workspace_id: &str) -> ServiceResult<Option<Role>> {
    if user.is_admin != 0 {
        return Ok(Some(Role::Owner));
    }
    let mut conn = app.db.read().await?;
    Ok(db::users::membership(&mut conn, &user.id, workspace_id)
        .await?
        .and_then(|m| Role::parse(&m.role).ok()))
}

/// Counts and records a password attempt for `account_key` from `ip` in one write transaction
/// (see [`db::sessions::reserve_attempt`]): `false` when the account or the address has too many
/// recent failures, and then nothing is recorded; else the id of the recorded attempt.
async fn reserve_attempt(app: &App, account_key: &str, ip: &str, now: i64) -> ServiceResult<Option<String>> {
    let id = new_id();
    let ip = throttled_address(ip);
    let ip = ip.as_str();
    let mut tx = app.db.begin_write().await?;
    let reserved = db::sessions::reserve_attempt(
        &mut tx,
        app.db.backend(),
        &id,
        account_key,
        ip,
        now,
        now - THROTTLE_WINDOW_MS,
        (MAX_FAILURES_PER_ACCOUNT, MAX_FAILURES_PER_IP),
    )
    .await?;
    tx.commit().await?;
    Ok(reserved.then_some(id))
}

/// What the per-address throttle counts `ip` as: the address itself, or for IPv6 its /64
/// (written `network/64`), whose other addresses a host can usually take at will. See
/// [`crate::net::client_network`].
fn throttled_address(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>().map(crate::net::client_network) {
        Ok(net @ std::net::IpAddr::V6(_)) => format!("{net}/64"),
        Ok(v4) => v4.to_string(),
        Err(_) => ip.to_string(),
    }
}

/// The throttle key of an account: SHA-256 of the normalized email (unknown or not).
fn account_key(email_normalized: &str) -> String {
    crypto::sha256_hex(format!("login:{email_normalized}").as_bytes())
}

/// A fresh session: the cookie value (shown to the browser once, never stored) and its row.
#[derive(Debug)]
pub struct NewSession {
    /// The token for the cookie.
    pub token: SecretString,
    /// The stored session.
    pub session: SessionRow,
    /// The signed-in user.
    pub user: UserRow,
    /// The token of the browser's trusted-browser cookie, to set (a new one, or the same again).
    pub device: Option<SecretString>,
}

/// How a sign-in attempt ended.
#[derive(Debug)]
pub enum SignIn {
    /// Signed in.
    Success(Box<NewSession>),
    /// Wrong email or password, or a disabled account: the same answer for all three.
    Invalid,
    /// Too many failures for this account or from this address.
    Throttled,
}

/// Signs in with email and password from client address `ip`. `previous_token` is the session
/// cookie the browser already had, if any: that session ends (a sign-in always makes a new one).
/// `device_token` is the browser's trusted-browser cookie, if any: when it is this account's,
/// the attempt counts against the browser rather than the account.
pub async fn sign_in(
    app: &App,
    email: &str,
    password: &SecretString,
    ip: &str,
    previous_token: Option<&str>,
    device_token: Option<&str>,
) -> ServiceResult<SignIn> {
    let normalized = normalize_email(email).unwrap_or_else(|_| email.trim().to_lowercase());
    let now = app.now_ms();
    let (user, device) = {
        let mut conn = app.db.read().await?;
        let user = db::users::get_by_email(&mut conn, &normalized).await?;
        let device = match device_token {
            Some(t) => {
                db::sessions::device_by_token_hash(&mut conn, &crypto::sha256_hex(t.as_bytes()), now).await?
            }
            None => None,
        };
        (user, device)
    };
    // Only a browser this account signed in from: another account's cookie is no cookie.
    let device = device.filter(|d| user.as_ref().is_some_and(|u| u.id == d.user_id));
    let key = match &device {
        Some(d) => format!("device:{}", d.id),
        None => account_key(&normalized),
    };
    // The attempt counts as a failure from before the password is checked (see
    // `reserve_attempt`); a success clears it with the other failures of the same key.
    if reserve_attempt(app, &key, ip, now).await?.is_none() {
        tracing::warn!(ip, trusted_browser = device.is_some(), "sign-in throttled");
        return Ok(SignIn::Throttled);
    }
    let ok = verify_password_async(user.as_ref().map(|u| u.password_hash.clone()), password).await?;
    let user = match user {
        Some(u) if ok && u.disabled_at.is_none() => u,
        other => {
            // Old failures no longer count: forget them as we go.
            db::sessions::purge_failures(&mut *app.db.writer().await?, now - THROTTLE_WINDOW_MS).await?;
            tracing::info!(ip, user_id = other.as_ref().map(|u| u.id.as_str()), "sign-in failed");
            return Ok(SignIn::Invalid);
        }
    };
    let trust = match (&device, device_token) {
        (Some(d), Some(token)) => Trust::Renew { id: &d.id, token },
        _ => Trust::New,
    };
    let new = open_session(app, user, ip, previous_token, Some(&key), trust, now).await?;
    Ok(SignIn::Success(Box::new(new)))
}

/// What a new session does about the browser's trust.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Trust<'a> {
    /// The browser gets a new trusted-browser cookie.
    New,
    /// The browser signed in with this trusted-browser record's cookie (`token`): it stays
    /// trusted, and gets the same cookie again, so that it keeps it as long as that.
    Renew {
        /// The record.
        id: &'a str,
        /// The cookie's token.
        token: &'a str,
    },
}

/// A new session of `user_id` from `ip`: the token for its cookie, and the row (which keeps only
/// the token's hash).
fn session_row(user_id: &str, ip: &str, now: i64) -> (String, SessionRow) {
    let token = crypto::random_token();
    let session = SessionRow {
        id: new_id(),
        token_hash: crypto::sha256_hex(token.as_bytes()),
        user_id: user_id.to_string(),
        created_at: now,
        last_seen_at: now,
        expires_at: now + SESSION_ABSOLUTE_MS,
        ip: Some(ip.chars().take(64).collect()),
    };
    (token, session)
}

/// A new trusted-browser record of `user_id`: the token for its cookie, and the row (which keeps
/// only the token's hash).
fn device_row(user_id: &str, now: i64) -> (String, db::sessions::DeviceRow) {
    let token = crypto::random_token();
    let row = db::sessions::DeviceRow {
        id: new_id(),
        token_hash: crypto::sha256_hex(token.as_bytes()),
        user_id: user_id.to_string(),
        created_at: now,
        last_used_at: now,
        expires_at: now + DEVICE_TRUST_MS,
    };
    (token, row)
}

/// A new session for `user`, signed in from `ip` (after a password check, or the creation of
/// the account): `previous_token`'s session ends, with `throttle_key` the failed sign-ins
/// counted under it are forgotten, and the browser is trusted (`trust`).
pub(crate) async fn open_session(
    app: &App,
    user: UserRow,
    ip: &str,
    previous_token: Option<&str>,
    throttle_key: Option<&str>,
    trust: Trust<'_>,
    now: i64,
) -> ServiceResult<NewSession> {
    let (token, session) = session_row(&user.id, ip, now);
    let mut tx = app.db.begin_write().await?;
    if let Some(previous) = previous_token {
        db::sessions::delete_by_token_hash(&mut tx, &crypto::sha256_hex(previous.as_bytes())).await?;
    }
    db::sessions::purge_expired(&mut tx, now, SESSION_IDLE_MS).await?;
    db::sessions::insert(&mut tx, &session).await?;
    db::users::record_login(&mut tx, &user.id, now).await?;
    if let Some(key) = throttle_key {
        db::sessions::clear_account_failures(&mut tx, key).await?;
    }
    let device = match trust {
        Trust::Renew { id, token } => {
            db::sessions::touch_device(&mut tx, id, now, now + DEVICE_TRUST_MS).await?;
            Some(SecretString::from(token.to_string()))
        }
        Trust::New => {
            let (token, row) = device_row(&user.id, now);
            db::sessions::purge_devices(&mut tx, now).await?;
            db::sessions::insert_device(&mut tx, &row, MAX_DEVICES_PER_USER).await?;
            Some(SecretString::from(token))
        }
    };
    audit::record(
        &mut tx,
        now,
        &Actor::User { id: user.id.clone() },
        None,
        "user.signed_in",
        "user",
        &user.id,
        serde_json::json!({"ip": session.ip}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %user.id, session_id = %session.id, "signed in");
    Ok(NewSession { token: SecretString::from(token), session, user, device })
}

/// A valid session and its user.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The session.
    pub session: SessionRow,
    /// The user.
    pub user: UserRow,
}

/// The session a cookie token names, if it is still valid: not past its absolute lifetime, not
/// idle for too long, its user not disabled. An ended session is deleted. Records activity.
pub async fn authenticate(app: &App, token: &str) -> ServiceResult<Option<Authenticated>> {
    if !crate::service::links::token_well_formed(token) {
        return Ok(None);
    }
    let now = app.now_ms();
    let mut conn = app.db.read().await?;
    let Some(session) =
        db::sessions::get_by_token_hash(&mut conn, &crypto::sha256_hex(token.as_bytes())).await?
    else {
        return Ok(None);
    };
    let ended = now >= session.expires_at || now - session.last_seen_at >= SESSION_IDLE_MS;
    let user = if ended { None } else { db::users::get(&mut conn, &session.user_id).await? };
    let Some(user) = user.filter(|u| u.disabled_at.is_none()) else {
        drop(conn);
        db::sessions::delete(&mut *app.db.writer().await?, &session.id).await?;
        tracing::info!(session_id = %session.id, "session ended (timeout or disabled user)");
        return Ok(None);
    };
    drop(conn);
    db::sessions::touch(&mut *app.db.writer().await?, &session.id, now).await?;
    Ok(Some(Authenticated { session, user }))
}

/// Ends the session a cookie token names (sign-out).
pub async fn sign_out(app: &App, token: &str) -> ServiceResult<()> {
    let hash = crypto::sha256_hex(token.as_bytes());
    let mut tx = app.db.begin_write().await?;
    if let Some(s) = db::sessions::get_by_token_hash(&mut tx, &hash).await? {
        db::sessions::delete(&mut tx, &s.id).await?;
        audit::record(
            &mut tx,
            app.now_ms(),
            &Actor::User { id: s.user_id.clone() },
            None,
            "user.signed_out",
            "user",
            &s.user_id,
            serde_json::json!({}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_counts_an_ipv6_address_by_its_network() {
        assert_eq!(throttled_address("203.0.113.9"), "203.0.113.9");
        assert_eq!(throttled_address("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::/64");
        assert_eq!(throttled_address("2001:db8:1:2::1"), throttled_address("2001:db8:1:2:ffff::"));
        assert_ne!(throttled_address("2001:db8:1:2::1"), throttled_address("2001:db8:1:3::1"));
        assert_eq!(throttled_address("::ffff:192.0.2.7"), "192.0.2.7", "IPv4-mapped counts as IPv4");
        assert_eq!(throttled_address("not an address"), "not an address");
    }

    #[test]
    fn password_hashes_use_the_owasp_argon2id_parameters() {
        let phc = hash_password("correct horse battery staple").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let parsed = PasswordHash::new(&phc).unwrap();
        // 16 bytes of salt.
        let mut salt = [0u8; 64];
        assert_eq!(parsed.salt.unwrap().decode_b64(&mut salt).unwrap().len(), 16);
        assert!(verify_password(&phc, "correct horse battery staple"));
        assert!(!verify_password(&phc, "correct horse battery stapl"));
        assert!(!verify_password("not a hash", "x"));
        // A fresh salt each time.
        assert_ne!(phc, hash_password("correct horse battery staple").unwrap());
    }

    #[test]
    fn the_dummy_hash_has_the_same_parameters() {
        assert!(DUMMY_HASH.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
        assert!(!verify_password(DUMMY_HASH, ""));
    }

    #[test]
    fn emails_are_normalized() {
        assert_eq!(normalize_email("  Ann@Example.COM ").unwrap(), "ann@example.com");
        for bad in ["", "ann", "@example.com", "ann@", "a b@example.com", "ann@.com"] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_checked() {
        assert!(validate_password("p", "short", "a@b.c").is_err());
        assert!(validate_password("p", "a@example.com", "a@example.com").is_err());
        assert!(validate_password("p", &"x".repeat(300), "a@b.c").is_err());
        assert!(validate_password("p", "a long enough password", "a@b.c").is_ok());
    }

    #[test]
    fn roles_parse() {
        assert_eq!(Role::parse("owner").unwrap(), Role::Owner);
        assert_eq!(Role::parse("member").unwrap(), Role::Member);
        assert!(Role::parse("admin").is_err());
    }
}
