//! Invitations to a workspace: how an owner adds someone in the dashboard.
//!
//! An owner names an email address and a role. Someone who is already a member of the workspace
//! gets the new role at once; anyone else gets an invitation: a link (`/app/invite/{token}`,
//! shown to the owner once, valid for [`INVITATION_LIFETIME_MS`], single-use) that the owner
//! passes on. The owner's answer is the same whether or not an account uses the address, and
//! nobody joins a workspace without accepting:
//! - whoever holds the link and is signed in to the account of that address joins with one
//!   click;
//! - when no account uses the address, the holder creates it with a password of their own and
//!   is signed in.
//!
//! authlink sends no email, so the link is a bearer credential and proves nothing about the
//! address: its holder (the owner who made it, too) sees whether an account uses the address,
//! and can create that account. The README says so, and tells operators to make sure of the
//! person before attaching an existing account elsewhere with `user add-member`.
//!
//! The token is stored only as SHA-256. A new invitation of the same address replaces the
//! pending one; an owner can revoke a pending invitation.

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use time::OffsetDateTime;

use super::users::{self, MemberView, NewSession, Role};
use super::{Actor, ServiceError, ServiceResult, audit};
use crate::clock::from_millis;
use crate::crypto;
use crate::db::invitations::{InvitationRow, Which};
use crate::db::users::{MembershipRow, UserRow};
use crate::db::{self, DbError, new_id};
use crate::domain::FieldError;
use crate::state::App;

/// How long an invitation link works: seven days.
pub const INVITATION_LIFETIME_MS: i64 = 7 * 24 * 3600 * 1000;

/// A pending invitation as owners see it (never its token).
#[derive(Debug, Clone, Serialize)]
pub struct InvitationView {
    /// Id.
    pub id: String,
    /// The address invited.
    pub email: String,
    /// `owner` or `member`.
    pub role: String,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the link stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

fn view(row: &InvitationRow) -> InvitationView {
    InvitationView {
        id: row.id.clone(),
        email: row.email.clone(),
        role: row.role.clone(),
        created_at: from_millis(row.created_at),
        expires_at: from_millis(row.expires_at),
    }
}

/// What adding someone by address came to.
#[derive(Debug)]
pub enum Added {
    /// A member of the workspace already: their role is now the one asked for.
    RoleChanged(MemberView),
    /// Anyone else: an invitation, with the link's token (shown once).
    Invited {
        /// The invitation.
        invitation: InvitationView,
        /// The token of its link.
        token: SecretString,
    },
}

/// Gives a member of the workspace the role `role`, or invites `email` to join as `role`.
pub async fn add(
    app: &App,
    actor: &Actor,
    workspace_id: &str,
    email: &str,
    role: &str,
) -> ServiceResult<Added> {
    let mut errors = super::Errors::default();
    let normalized = errors.take(users::normalize_email(email));
    let parsed = errors.take(Role::parse(role));
    errors.finish()?;
    let (Some(normalized), Some(role)) = (normalized, parsed) else {
        return Err(FieldError::new("email", "is invalid").into());
    };
    let member = {
        let mut conn = app.db.read().await?;
        if db::workspaces::get(&mut conn, workspace_id).await?.is_none() {
            return Err(ServiceError::NotFound("workspace"));
        }
        match db::users::get_by_email(&mut conn, &normalized).await? {
            Some(u) => db::users::membership(&mut conn, &u.id, workspace_id).await?.is_some(),
            None => false,
        }
    };
    if member {
        let view = users::add_member(app, actor, workspace_id, email, role.as_str()).await?;
        return Ok(Added::RoleChanged(view));
    }
    let token = crypto::random_token();
    let now = app.now_ms();
    let row = InvitationRow {
        id: new_id(),
        workspace_id: workspace_id.to_string(),
        email: email.trim().to_string(),
        email_normalized: normalized,
        role: role.as_str().to_string(),
        token_hash: crypto::sha256_hex(token.as_bytes()),
        created_by: match actor {
            Actor::User { id } => Some(id.clone()),
            _ => None,
        },
        created_at: now,
        expires_at: now + INVITATION_LIFETIME_MS,
        accepted_at: None,
        accepted_by: None,
        revoked_at: None,
    };
    let mut tx = app.db.begin_write().await?;
    // The inviter may have lost the right to invite since its request was let in (removed, made a
    // member or disabled, whose invitations are withdrawn with it): checked again in line with
    // the changes of members, so that no invitation is written after that withdrawal.
    db::advisory_lock(&mut tx, app.db.backend(), &users::members_lock(workspace_id)).await?;
    users::still_entitled(&mut tx, app, actor, workspace_id).await?;
    // One pending invitation per address: the newest.
    db::invitations::revoke_pending(&mut tx, workspace_id, Which::Email(&row.email_normalized), now).await?;
    db::invitations::insert(&mut tx, &row).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        Some(workspace_id),
        "member.invited",
        "invitation",
        &row.id,
        serde_json::json!({"email": row.email, "role": row.role}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(invitation_id = %row.id, workspace_id, "member invited");
    Ok(Added::Invited { invitation: view(&row), token: SecretString::from(token) })
}

/// A workspace's invitations that can still be accepted, newest first.
pub async fn pending(app: &App, workspace_id: &str) -> ServiceResult<Vec<InvitationView>> {
    let mut conn = app.db.read().await?;
    Ok(db::invitations::pending(&mut conn, workspace_id, app.now_ms()).await?.iter().map(view).collect())
}

/// Revokes a pending invitation of the workspace: its link stops working at once.
pub async fn revoke(app: &App, actor: &Actor, workspace_id: &str, id: &str) -> ServiceResult<()> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("invitation"));
    }
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    if db::invitations::revoke_pending(&mut tx, workspace_id, Which::Id(id), now).await? == 0 {
        return Err(ServiceError::NotFound("invitation"));
    }
    audit::record(
        &mut tx,
        now,
        actor,
        Some(workspace_id),
        "invitation.revoked",
        "invitation",
        id,
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Why an invitation link no longer works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Somebody accepted it.
    Accepted,
    /// An owner revoked it, or invited the address again.
    Revoked,
    /// Past its seven days.
    Expired,
}

/// An invitation that can be accepted, as its link's holder sees it.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The invitation.
    pub row: InvitationRow,
    /// The workspace's name (as the dashboard shows it).
    pub workspace_name: String,
    /// The workspace's slug.
    pub workspace_slug: String,
    /// Whether an account uses the invited address (then the holder signs in to accept; else
    /// creates it). Shown only to the holder of the link.
    pub account_exists: bool,
}

/// What an invitation link leads to.
#[derive(Debug, Clone)]
pub enum Opened {
    /// No invitation has this token.
    Unknown,
    /// It no longer works.
    Ended(Ended),
    /// It can be accepted.
    Pending(Box<Pending>),
}

/// Looks up the invitation of a link's token, read-only.
pub async fn open(app: &App, token: &str) -> ServiceResult<Opened> {
    if !super::links::token_well_formed(token) {
        return Ok(Opened::Unknown);
    }
    let mut conn = app.db.read().await?;
    let Some(row) = db::invitations::by_token_hash(&mut conn, &crypto::sha256_hex(token.as_bytes())).await?
    else {
        return Ok(Opened::Unknown);
    };
    let ended = if row.accepted_at.is_some() {
        Some(Ended::Accepted)
    } else if row.revoked_at.is_some() {
        Some(Ended::Revoked)
    } else if row.expires_at <= app.now_ms() {
        Some(Ended::Expired)
    } else {
        None
    };
    if let Some(ended) = ended {
        return Ok(Opened::Ended(ended));
    }
    let Some(ws) = db::workspaces::get(&mut conn, &row.workspace_id).await? else {
        return Ok(Opened::Unknown);
    };
    let account_exists = db::users::get_by_email(&mut conn, &row.email_normalized).await?.is_some();
    Ok(Opened::Pending(Box::new(Pending {
        row,
        workspace_name: ws.name,
        workspace_slug: ws.slug,
        account_exists,
    })))
}

/// Why an invitation could not be accepted.
#[derive(Debug)]
pub enum Refused {
    /// The link leads nowhere, or no longer works.
    Gone(Opened),
    /// The signed-in account is not the invited address's.
    OtherAccount {
        /// The address the invitation is for.
        invited: String,
    },
    /// An account uses the address (sign in to accept), or none does (create it to accept).
    WrongPath,
}

/// The accepted invitation: the workspace joined.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Its slug, for the way in.
    pub workspace_slug: String,
}

/// Accepts the invitation as `user`, who must be signed in to the invited address's account.
pub async fn accept(app: &App, token: &str, user: &UserRow) -> ServiceResult<Result<Joined, Refused>> {
    let pending = match open(app, token).await? {
        Opened::Pending(p) => p,
        other => return Ok(Err(Refused::Gone(other))),
    };
    if user.email_normalized != pending.row.email_normalized {
        return Ok(Err(Refused::OtherAccount { invited: pending.row.email.clone() }));
    }
    let now = app.now_ms();
    let mut tx = app.db.begin_write().await?;
    if !join(&mut tx, app.db.backend(), &pending.row, user, now).await? {
        return Ok(Err(Refused::Gone(Opened::Ended(Ended::Accepted))));
    }
    tx.commit().await?;
    tracing::info!(invitation_id = %pending.row.id, user_id = %user.id, "invitation accepted");
    Ok(Ok(Joined { workspace_slug: pending.workspace_slug }))
}

/// Accepts the invitation by creating the invited address's account with `password` (typed
/// twice: `confirm`), and signs it in from `ip`. Only while no account uses the address.
pub async fn accept_with_new_account(
    app: &App,
    token: &str,
    password: &SecretString,
    confirm: &SecretString,
    ip: &str,
    previous_session: Option<&str>,
) -> ServiceResult<Result<(Joined, NewSession), Refused>> {
    let pending = match open(app, token).await? {
        Opened::Pending(p) => p,
        other => return Ok(Err(Refused::Gone(other))),
    };
    if pending.account_exists {
        return Ok(Err(Refused::WrongPath));
    }
    let row = &pending.row;
    users::validate_password("password", password.expose_secret(), &row.email_normalized)?;
    if password.expose_secret() != confirm.expose_secret() {
        return Err(FieldError::new("confirm", "does not match the password").into());
    }
    let hash = users::hash_password_async(password).await?;
    let now = app.now_ms();
    let user = UserRow {
        id: new_id(),
        email: row.email.clone(),
        email_normalized: row.email_normalized.clone(),
        password_hash: hash,
        is_admin: 0,
        disabled_at: None,
        created_at: now,
        updated_at: now,
        password_changed_at: now,
        last_login_at: None,
    };
    let actor = Actor::User { id: user.id.clone() };
    let mut tx = app.db.begin_write().await?;
    match db::users::insert(&mut tx, &user).await {
        // Created meanwhile (another tab, the command line): sign in to accept.
        Err(DbError::Conflict(_)) => return Ok(Err(Refused::WrongPath)),
        other => other?,
    }
    audit::record(
        &mut tx,
        now,
        &actor,
        None,
        "user.created",
        "user",
        &user.id,
        serde_json::json!({"email": user.email, "admin": false, "invitation": row.id}),
    )
    .await?;
    if !join(&mut tx, app.db.backend(), row, &user, now).await? {
        return Ok(Err(Refused::Gone(Opened::Ended(Ended::Accepted))));
    }
    tx.commit().await?;
    tracing::info!(invitation_id = %row.id, user_id = %user.id, "account created through an invitation");
    let session = users::open_session(app, user, ip, previous_session, None, users::Trust::New, now).await?;
    Ok(Ok((Joined { workspace_slug: pending.workspace_slug.clone() }, session)))
}

/// Marks the invitation accepted by `user` and makes them a member with its role, in `tx`;
/// `false` (nothing written) when it was accepted, revoked or expired meanwhile. A member of the
/// workspace already keeps the higher of the two roles.
async fn join(
    tx: &mut sqlx::AnyConnection,
    backend: db::Backend,
    row: &InvitationRow,
    user: &UserRow,
    now: i64,
) -> ServiceResult<bool> {
    // Under the lock of the workspace's member changes: a demotion of this user running at the
    // same moment is not undone by the role read here.
    db::advisory_lock(tx, backend, &super::users::members_lock(&row.workspace_id)).await?;
    if !db::invitations::accept(tx, &row.id, &user.id, now).await? {
        return Ok(false);
    }
    let before = db::users::membership(tx, &user.id, &row.workspace_id).await?;
    let role = match &before {
        Some(b) if b.role == Role::Owner.as_str() => Role::Owner.as_str(),
        _ => row.role.as_str(),
    };
    db::users::upsert_membership(
        tx,
        &MembershipRow {
            user_id: user.id.clone(),
            workspace_id: row.workspace_id.clone(),
            role: role.to_string(),
            created_at: before.as_ref().map_or(now, |b| b.created_at),
        },
    )
    .await?;
    audit::record(
        tx,
        now,
        &Actor::User { id: user.id.clone() },
        Some(&row.workspace_id),
        "member.added",
        "user",
        &user.id,
        serde_json::json!({"email": user.email, "role": role, "invitation": row.id}),
    )
    .await?;
    Ok(true)
}
