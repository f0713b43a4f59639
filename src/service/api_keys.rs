//! API keys: `alk_<12 hex>_<43 base64url>`. The first part (the prefix) is visible and used for
//! lookup; the key is shown once and stored only as its SHA-256, compared in constant time.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{Actor, Scope, ServiceError, ServiceResult, audit, workspaces};
use crate::clock::from_millis;
use crate::crypto;
use crate::db::api_keys::ApiKeyRow;
use crate::db::{self, new_id};
use crate::domain::{self, FieldError};
use crate::state::App;
use sqlx::AnyConnection;

/// An API key as listed (never the key itself).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApiKeyView {
    /// Id.
    pub id: String,
    /// The workspace it is scoped to; `null` for platform-admin keys.
    pub workspace_id: Option<String>,
    /// Whether it spans every workspace.
    pub admin: bool,
    /// Its name.
    pub name: String,
    /// The visible start of the key.
    pub prefix: String,
    /// Who created it.
    pub created_by: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// Last use.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<OffsetDateTime>,
    /// Revocation time.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
}

impl From<&ApiKeyRow> for ApiKeyView {
    fn from(k: &ApiKeyRow) -> Self {
        Self {
            id: k.id.clone(),
            workspace_id: k.workspace_id.clone(),
            admin: k.workspace_id.is_none(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            created_by: k.created_by.clone(),
            created_at: from_millis(k.created_at),
            last_used_at: k.last_used_at.map(from_millis),
            revoked_at: k.revoked_at.map(from_millis),
        }
    }
}

/// A freshly created key: the only time the secret is shown.
#[derive(Clone, Serialize, ToSchema)]
pub struct CreatedApiKey {
    /// The key's metadata.
    #[serde(flatten)]
    pub key: ApiKeyView,
    /// The whole key. Store it now: it cannot be shown again.
    pub secret: String,
}
redacted_debug!(CreatedApiKey, shown: [key], hidden: [secret]);

/// Input of [`create`].
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// The workspace; implied for workspace keys. Omit with `admin: true` for a platform-admin key.
    pub workspace_id: Option<String>,
    /// A platform-admin key (only platform admins may create one).
    #[serde(default)]
    pub admin: bool,
    /// A name to recognise it by.
    #[schema(max_length = 200)]
    pub name: Option<String>,
}

/// Most keys active at once in one workspace (and platform-admin keys in all).
pub const MAX_ACTIVE_KEYS: i64 = 50;

/// Creates a key.
pub async fn create(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    input: NewApiKey,
) -> ServiceResult<CreatedApiKey> {
    let name =
        domain::parse_optional_label("name", input.name.as_deref())?.unwrap_or_else(|| "default".into());
    let workspace_id = if input.admin {
        if *scope != Scope::Admin {
            return Err(ServiceError::Forbidden("only platform admins can create platform-admin keys"));
        }
        if input.workspace_id.is_some() {
            return Err(FieldError::new("workspace_id", "a platform-admin key has no workspace").into());
        }
        None
    } else {
        let w = workspaces::for_new_object(
            app,
            scope,
            input.workspace_id.as_deref(),
            "is required (or ask for an admin key)",
        )
        .await?;
        Some(w.id)
    };
    let prefix = format!("alk_{}", hex::encode(crypto::random_bytes::<6>()));
    let secret = format!("{prefix}_{}", crypto::random_token());
    let now = app.now_ms();
    let row = ApiKeyRow {
        id: new_id(),
        workspace_id,
        name,
        prefix,
        key_hash: crypto::sha256_hex(secret.as_bytes()),
        created_by: actor.label(),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    };
    let mut tx = app.db.begin_write().await?;
    // (One creation at a time per workspace, so that two cannot both pass the limit.)
    db::advisory_lock(
        &mut tx,
        app.db.backend(),
        &format!("api keys:{}", row.workspace_id.as_deref().unwrap_or("admin")),
    )
    .await?;
    // The maker may have lost the right to make keys since its request was let in: a key
    // revoked, an owner removed, made a member or disabled (whose keys are revoked with what
    // they made: a key made after that walk would outlive it).
    let entitled = match actor {
        Actor::ApiKey { id } => db::api_keys::is_active_locked(&mut tx, app.db.backend(), id).await?,
        Actor::User { id } => {
            db::users::may_make_keys_locked(&mut tx, app.db.backend(), id, row.workspace_id.as_deref())
                .await?
        }
        Actor::Cli | Actor::Client | Actor::System => true,
    };
    if !entitled {
        return Err(ServiceError::Forbidden("the right to make keys here was withdrawn meanwhile"));
    }
    if db::api_keys::count_active(&mut tx, row.workspace_id.as_deref()).await? >= MAX_ACTIVE_KEYS {
        return Err(ServiceError::Conflict(format!(
            "at most {MAX_ACTIVE_KEYS} keys can be active at once, per workspace (and platform-admin keys in all); revoke one first"
        )));
    }
    db::api_keys::insert(&mut tx, &row).await?;
    audit::record(
        &mut tx,
        now,
        actor,
        row.workspace_id.as_deref(),
        "api_key.created",
        "api_key",
        &row.id,
        serde_json::json!({"name": row.name, "prefix": row.prefix, "admin": row.workspace_id.is_none()}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(api_key_id = %row.id, prefix = %row.prefix, "API key created");
    Ok(CreatedApiKey { key: ApiKeyView::from(&row), secret })
}

/// Keys visible to the caller (admins see every key), or those of one workspace among them
/// (`workspace`, an id or slug; one the caller may not see is not found).
pub async fn list(app: &App, scope: &Scope, workspace: Option<&str>) -> ServiceResult<Vec<ApiKeyView>> {
    let mut conn = app.db.read().await?;
    let workspace = scope.listing_workspace(&mut conn, workspace).await?;
    let rows = db::api_keys::list(&mut conn, workspace.as_deref()).await?;
    Ok(rows.iter().map(ApiKeyView::from).collect())
}

/// Revokes a key: the next request with it gets 401.
pub async fn revoke(app: &App, actor: &Actor, scope: &Scope, id: &str) -> ServiceResult<ApiKeyView> {
    if !db::is_id(id) {
        return Err(ServiceError::NotFound("API key"));
    }
    let mut tx = app.db.begin_write().await?;
    let Some(mut row) = db::api_keys::get(&mut tx, id).await? else {
        return Err(ServiceError::NotFound("API key"));
    };
    let visible = match (&row.workspace_id, scope) {
        (_, Scope::Admin) => true,
        (Some(w), Scope::Workspace(own)) => w == own,
        (None, Scope::Workspace(_)) => false,
    };
    if !visible {
        return Err(ServiceError::NotFound("API key"));
    }
    if row.revoked_at.is_none() {
        let now = app.now_ms();
        db::api_keys::revoke(&mut tx, id, now).await?;
        row.revoked_at = Some(now);
        audit::record(
            &mut tx,
            now,
            actor,
            row.workspace_id.as_deref(),
            "api_key.revoked",
            "api_key",
            &row.id,
            serde_json::json!({"prefix": row.prefix}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(ApiKeyView::from(&row))
}

/// Revokes the active keys `creator` (a `created_by` value) made, in `workspace_id` or in any
/// (`None`), and the keys those keys made, and so on, through keys already revoked; each
/// revocation is in the audit log with `because`. Returns how many keys were revoked. For a
/// person who loses the right to the keys they made (removed, no longer an owner, disabled):
/// they saw every secret once. A key revoked by itself does not take the keys it made along,
/// since revoking the old key is the last step of a routine rotation (the dashboard shows which
/// key made which); but the new key is still its maker's, and goes when its maker's right does.
/// Run after the change that withdraws the right, in its transaction: a key being made
/// meanwhile either waits for it and is refused, or is found here (see [`create`]).
pub async fn revoke_made_by(
    conn: &mut AnyConnection,
    now: i64,
    actor: &Actor,
    creator: &str,
    workspace_id: Option<&str>,
    because: &str,
) -> ServiceResult<usize> {
    let mut creators = vec![creator.to_string()];
    let mut revoked = 0;
    while let Some(creator) = creators.pop() {
        for key in db::api_keys::made_by(&mut *conn, &creator, workspace_id).await? {
            creators.push(Actor::ApiKey { id: key.id.clone() }.label());
            if key.revoked_at.is_some() {
                continue;
            }
            db::api_keys::revoke(&mut *conn, &key.id, now).await?;
            audit::record(
                &mut *conn,
                now,
                actor,
                key.workspace_id.as_deref(),
                "api_key.revoked",
                "api_key",
                &key.id,
                serde_json::json!({"prefix": key.prefix, "because": because, "made_by": creator}),
            )
            .await?;
            revoked += 1;
        }
    }
    Ok(revoked)
}

/// The caller a presented key authenticates, or `None` (unknown, malformed or revoked).
pub async fn authenticate(app: &App, presented: &str) -> ServiceResult<Option<(Actor, Scope)>> {
    // alk_ + 12 hex, then _ + 43 base64url characters.
    let Some(prefix) = presented.get(..16).filter(|p| p.starts_with("alk_")) else {
        return Ok(None);
    };
    if presented.len() != 16 + 1 + 43 || presented.as_bytes()[16] != b'_' {
        return Ok(None);
    }
    let mut conn = app.db.read().await?;
    let Some(row) = db::api_keys::get_by_prefix(&mut conn, prefix).await? else {
        return Ok(None);
    };
    let presented_hash = crypto::sha256_hex(presented.as_bytes());
    if !crypto::constant_time_eq(presented_hash.as_bytes(), row.key_hash.as_bytes())
        || row.revoked_at.is_some()
    {
        return Ok(None);
    }
    drop(conn);
    db::api_keys::touch(&mut *app.db.writer().await?, &row.id, app.now_ms()).await?;
    let scope = match row.workspace_id {
        Some(w) => Scope::Workspace(w),
        None => Scope::Admin,
    };
    Ok(Some((Actor::ApiKey { id: row.id }, scope)))
}
