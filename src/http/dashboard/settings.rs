//! Workspace settings: API keys (created keys are shown once), members (owners and admins add
//! and remove them), and branding with a live preview of the client's landing page.
//!
//! Everyone in a workspace can see these pages; only owners (and platform admins) can change
//! them.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::{
    Ctx, DashError, DashResult, FormData, FormErrors, Layout, ListParams, Ws, fmt_opt, fmt_time, layout,
    render, require_owner, see_other, workspace,
};
use crate::domain::{self, FieldError};
use crate::service::ServiceError;
use crate::service::api_keys::{self, ApiKeyView, CreatedApiKey, NewApiKey};
use crate::service::invitations::{self, Added};
use crate::service::users::{self, MemberView};
use crate::service::workspaces::{self, Branding, WorkspaceUpdate};
use crate::state::AppState;

/// An API key as listed.
struct KeyRow {
    id: String,
    name: String,
    prefix: String,
    revoked: bool,
    created: String,
    /// Who made it, in words: an address, another key, the command line.
    made_by: String,
    last_used: String,
}

impl KeyRow {
    fn new(k: &ApiKeyView, made_by: String) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            revoked: k.revoked_at.is_some(),
            created: fmt_time(k.created_at),
            made_by,
            last_used: fmt_opt(k.last_used_at),
        }
    }
}

/// Who made a key, in words, from its `created_by`: the user's address, the key's prefix (or
/// "a platform-admin key" for one this page does not list), "the command line".
async fn made_by(state: &AppState, keys: &[ApiKeyView], created_by: &str) -> Result<String, DashError> {
    Ok(match created_by.split_once(':') {
        Some(("user", id)) => match users::get(state, id).await {
            Ok(u) => u.email,
            Err(crate::service::ServiceError::NotFound(_)) => "a deleted account".into(),
            Err(e) => return Err(e.into()),
        },
        Some(("api_key", id)) => match keys.iter().find(|k| k.id == id) {
            Some(k) => format!("the key {}…", k.prefix),
            None => "a platform-admin key".into(),
        },
        _ if created_by == "cli" => "the command line".into(),
        _ => created_by.into(),
    })
}

#[derive(Template)]
#[template(path = "dashboard/api_keys.html")]
struct KeysPage {
    l: Layout,
    slug: String,
    keys: Vec<KeyRow>,
    created: Option<CreatedApiKey>,
    name: String,
    errors: FormErrors,
    can_manage: bool,
}

async fn keys_page(
    state: &AppState,
    ctx: &Ctx,
    ws: &Ws,
    status: StatusCode,
    created: Option<CreatedApiKey>,
    (name, errors): (String, FormErrors),
    notice: Option<&str>,
) -> DashResult {
    let keys = api_keys::list(state, &ws.scope, None).await?;
    // Each maker looked up once, however many keys they made.
    let mut makers = std::collections::HashMap::<&str, String>::new();
    let mut rows = Vec::with_capacity(keys.len());
    for k in &keys {
        if !makers.contains_key(k.created_by.as_str()) {
            makers.insert(&k.created_by, made_by(state, &keys, &k.created_by).await?);
        }
        rows.push(KeyRow::new(k, makers[k.created_by.as_str()].clone()));
    }
    let page = KeysPage {
        l: layout(state, ctx, Some(ws), "api-keys", notice).await?,
        slug: ws.row.slug.clone(),
        keys: rows,
        created,
        name,
        errors,
        can_manage: ws.can_manage(),
    };
    Ok(render(status, &page))
}

/// `GET /app/w/{slug}/api-keys`.
pub async fn api_keys(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    keys_page(
        &state,
        &ctx,
        &ws,
        StatusCode::OK,
        None,
        (String::new(), FormErrors::default()),
        q.notice.as_deref(),
    )
    .await
}

/// `POST /app/w/{slug}/api-keys`: creates a key and shows it, this once.
pub async fn create_api_key(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    form: FormData,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    let name = form.get("name").to_string();
    let input = NewApiKey {
        workspace_id: Some(ws.row.id.clone()),
        admin: false,
        name: Some(name.clone()).filter(|n| !n.trim().is_empty()),
    };
    match api_keys::create(&state, &ctx.actor, &ws.scope, input).await {
        Ok(created) => {
            keys_page(
                &state,
                &ctx,
                &ws,
                StatusCode::CREATED,
                Some(created),
                (String::new(), FormErrors::default()),
                None,
            )
            .await
        }
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            keys_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, None, (name, errors), None).await
        }
    }
}

/// `POST /app/w/{slug}/api-keys/{id}/revoke`.
pub async fn revoke_api_key(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    api_keys::revoke(&state, &ctx.actor, &ws.scope, &id).await?;
    Ok(see_other(&format!("/app/w/{}/api-keys?notice=key_revoked", ws.row.slug)))
}

/// A member as listed.
struct MemberRow {
    user_id: String,
    email: String,
    role: String,
    disabled: bool,
    since: String,
    is_me: bool,
}

/// A pending invitation as listed.
struct InvitationRow {
    id: String,
    email: String,
    role: String,
    expires: String,
}

/// An invitation just made: its link, shown once.
struct NewInvitation {
    email: String,
    url: String,
}

#[derive(Template)]
#[template(path = "dashboard/members.html")]
struct MembersPage {
    l: Layout,
    slug: String,
    members: Vec<MemberRow>,
    invitations: Vec<InvitationRow>,
    invited: Option<NewInvitation>,
    can_manage: bool,
    email: String,
    role: String,
    errors: FormErrors,
}

async fn members_page(
    state: &AppState,
    ctx: &Ctx,
    ws: &Ws,
    status: StatusCode,
    (email, role, errors): (String, String, FormErrors),
    (invited, notice): (Option<NewInvitation>, Option<&str>),
) -> DashResult {
    let members: Vec<MemberView> = users::members(state, &ws.row.id).await?;
    // Members see who is in the workspace; owners also see who is invited.
    let pending = if ws.can_manage() { invitations::pending(state, &ws.row.id).await? } else { Vec::new() };
    let page = MembersPage {
        invitations: pending
            .into_iter()
            .map(|i| InvitationRow {
                id: i.id,
                email: i.email,
                role: i.role,
                expires: fmt_time(i.expires_at),
            })
            .collect(),
        invited,
        l: layout(state, ctx, Some(ws), "members", notice).await?,
        slug: ws.row.slug.clone(),
        members: members
            .into_iter()
            .map(|m| MemberRow {
                is_me: m.user_id == ctx.user.id,
                user_id: m.user_id,
                email: m.email,
                role: m.role,
                disabled: m.disabled,
                since: fmt_time(m.since),
            })
            .collect(),
        can_manage: ws.can_manage(),
        email,
        role,
        errors,
    };
    Ok(render(status, &page))
}

/// `GET /app/w/{slug}/members`.
pub async fn members(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let blank = (String::new(), "member".to_string(), FormErrors::default());
    members_page(&state, &ctx, &ws, StatusCode::OK, blank, (None, q.notice.as_deref())).await
}

/// `POST /app/w/{slug}/members`: changes a member's role, or invites the address (owners and
/// admins). The answer does not tell whether an account uses the address.
pub async fn add_member(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    form: FormData,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    let email = form.get("email").to_string();
    let role = form.get("role").to_string();
    match invitations::add(&state, &ctx.actor, &ws.row.id, &email, &role).await {
        Ok(Added::RoleChanged(_)) => {
            Ok(see_other(&format!("/app/w/{}/members?notice=member_added", ws.row.slug)))
        }
        Ok(Added::Invited { invitation, token }) => {
            use secrecy::ExposeSecret;
            let invited = NewInvitation {
                email: invitation.email,
                url: state.config.public(&format!("/app/invite/{}", token.expose_secret())),
            };
            let blank = (String::new(), "member".to_string(), FormErrors::default());
            members_page(&state, &ctx, &ws, StatusCode::CREATED, blank, (Some(invited), None)).await
        }
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            members_page(
                &state,
                &ctx,
                &ws,
                StatusCode::UNPROCESSABLE_ENTITY,
                (email, role, errors),
                (None, None),
            )
            .await
        }
    }
}

/// `POST /app/w/{slug}/invitations/{id}/revoke` (owners and admins).
pub async fn revoke_invitation(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    invitations::revoke(&state, &ctx.actor, &ws.row.id, &id).await?;
    Ok(see_other(&format!("/app/w/{}/members?notice=invitation_revoked", ws.row.slug)))
}

/// `POST /app/w/{slug}/members/{user_id}/remove` (owners and admins).
pub async fn remove_member(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((slug, user_id)): Path<(String, String)>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    users::remove_member(&state, &ctx.actor, &ws.row.id, &user_id).await?;
    // Whoever removed themselves can no longer see the workspace: to their list of workspaces.
    if user_id == ctx.user.id {
        return Ok(see_other("/app/workspaces?notice=left_workspace"));
    }
    Ok(see_other(&format!("/app/w/{}/members?notice=member_removed", ws.row.slug)))
}

/// The values of the branding form.
#[derive(Debug, Default)]
pub struct BrandingForm {
    /// The workspace's version the form was shown with: saving over a newer one is refused.
    version: String,
    name: String,
    display_name: String,
    logo_url: String,
    accent_color: String,
    allowed_redirects: String,
    success_redirect: String,
}

#[derive(Template)]
#[template(path = "dashboard/branding.html")]
struct BrandingPage {
    l: Layout,
    slug: String,
    v: BrandingForm,
    errors: FormErrors,
    can_manage: bool,
    preview_name: String,
    preview_monogram: String,
    /// The saved logo's copy, while the form names the saved logo URL.
    preview_logo: Option<String>,
    /// The preview's colour stylesheet (only for a valid colour).
    preview_css: Option<String>,
}

async fn branding_page(
    state: &AppState,
    ctx: &Ctx,
    ws: &Ws,
    status: StatusCode,
    v: BrandingForm,
    errors: FormErrors,
    notice: Option<&str>,
) -> DashResult {
    let preview_name = Some(v.display_name.trim())
        .filter(|s| !s.is_empty())
        .or(Some(v.name.trim()).filter(|s| !s.is_empty()))
        .unwrap_or(&ws.row.name)
        .to_string();
    let preview_css = domain::parse_accent_color(&v.accent_color)
        .ok()
        .map(|c| format!("/app/preview/{}.css", c.trim_start_matches('#')));
    let preview_logo = crate::http::pages::Brand::from(&ws.row)
        .logo_path()
        .filter(|_| ws.row.logo_url.as_deref() == Some(v.logo_url.trim()));
    let page = BrandingPage {
        l: layout(state, ctx, Some(ws), "branding", notice).await?,
        slug: ws.row.slug.clone(),
        preview_monogram: crate::http::pages::monogram(&preview_name),
        preview_logo,
        preview_name,
        preview_css,
        v,
        errors,
        can_manage: ws.can_manage(),
    };
    Ok(render(status, &page))
}

/// `GET /app/w/{slug}/branding`.
pub async fn branding(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    Query(q): Query<ListParams>,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    let w = &ws.row;
    let v = BrandingForm {
        version: w.updated_at.to_string(),
        name: w.name.clone(),
        display_name: w.display_name.clone().unwrap_or_default(),
        logo_url: w.logo_url.clone().unwrap_or_default(),
        accent_color: w.accent_color.clone().unwrap_or_default(),
        allowed_redirects: w.allow_list().iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
        success_redirect: w.success_redirect.clone().unwrap_or_default(),
    };
    branding_page(&state, &ctx, &ws, StatusCode::OK, v, FormErrors::default(), q.notice.as_deref()).await
}

/// `POST /app/w/{slug}/branding`: saves, or (the "Preview" button) shows the preview of the
/// values without saving them.
pub async fn save_branding(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(slug): Path<String>,
    form: FormData,
) -> DashResult {
    let ws = workspace(&state, &ctx, &slug).await?;
    require_owner(&ws)?;
    let mut v = BrandingForm {
        version: form.get("version").trim().to_string(),
        name: form.get("name").to_string(),
        display_name: form.get("display_name").to_string(),
        logo_url: form.get("logo_url").trim().to_string(),
        accent_color: form.get("accent_color").trim().to_string(),
        allowed_redirects: form.get("allowed_redirects").to_string(),
        success_redirect: form.get("success_redirect").trim().to_string(),
    };
    if form.get("action") == "preview" {
        return branding_page(&state, &ctx, &ws, StatusCode::OK, v, FormErrors::default(), None).await;
    }
    let input = WorkspaceUpdate {
        name: Some(v.name.clone()),
        branding: Some(Branding {
            display_name: Some(v.display_name.clone()).filter(|s| !s.trim().is_empty()),
            logo_url: Some(v.logo_url.clone()).filter(|s| !s.is_empty()),
            accent_color: Some(v.accent_color.clone()).filter(|s| !s.is_empty()),
        }),
        allowed_redirects: Some(
            v.allowed_redirects
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        ),
        success_redirect: Some(v.success_redirect.clone()),
    };
    // A form without the field (sent by a script, say) applies to any version; a field that
    // names no version matches none.
    let based_on = (!form.all("version").is_empty())
        .then(|| v.version.parse::<i64>().ok().into_iter().collect::<Vec<_>>());
    match workspaces::update(&state, &ctx.actor, &ws.scope, &ws.row.id, input, based_on.as_deref()).await {
        Ok(w) => Ok(see_other(&format!("/app/w/{}/branding?notice=branding_saved", w.slug))),
        // Saved by someone else since the form was shown (or while this save fetched the logo):
        // the form comes back with what was typed, unsaved, and the version now stored, so that
        // saving again replaces the other change knowingly.
        Err(ServiceError::Stale(_) | ServiceError::Conflict(_)) => {
            let ws = workspace(&state, &ctx, &slug).await?;
            v.version = ws.row.updated_at.to_string();
            let errors = FormErrors(vec![FieldError::new(
                "version",
                "someone else saved these settings after you opened this page. Your changes below \
                 are not saved: reload the page to see theirs, or save again to replace them with yours",
            )]);
            branding_page(&state, &ctx, &ws, StatusCode::CONFLICT, v, errors, None).await
        }
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            branding_page(&state, &ctx, &ws, StatusCode::UNPROCESSABLE_ENTITY, v, errors, None).await
        }
    }
}
