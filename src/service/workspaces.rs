//! Workspaces: create, read, update branding and the success-redirect allow-list.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{Actor, Errors, Scope, ServiceError, ServiceResult, audit};
use crate::clock::from_millis;
use crate::db::workspaces::WorkspaceRow;
use crate::db::{self, DbError, new_id};
use crate::domain::{self, FieldError};
use crate::state::App;

/// A workspace as the API and the CLI show it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkspaceView {
    /// Id.
    pub id: String,
    /// The agency's name.
    pub name: String,
    /// Unique URL-friendly name.
    pub slug: String,
    /// Client-facing branding.
    pub branding: Branding,
    /// Allowed success-redirect URLs (exact origin, path prefix).
    pub allowed_redirects: Vec<String>,
    /// Where the success page offers to send clients whose link names no redirect of its own
    /// (in the allow-list).
    pub success_redirect: Option<String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// The version this view shows, sent as the `ETag` header rather than in the body.
    #[serde(skip)]
    pub version: i64,
}

/// How client pages look.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Branding {
    /// The name clients see (defaults to the workspace name).
    #[schema(max_length = 200)]
    pub display_name: Option<String>,
    /// An https URL of the logo: a PNG, JPEG, GIF or WebP image of at most 256 KB and 4096
    /// pixels a side, answered without a redirect. authlink fetches it when the URL is set (a
    /// URL it cannot fetch, or that is not such an image, is refused) and client pages show
    /// that copy; to take a new copy of a changed image, set another URL.
    pub logo_url: Option<String>,
    /// `#rrggbb`.
    pub accent_color: Option<String>,
}

impl From<&WorkspaceRow> for WorkspaceView {
    fn from(w: &WorkspaceRow) -> Self {
        Self {
            id: w.id.clone(),
            name: w.name.clone(),
            slug: w.slug.clone(),
            branding: Branding {
                display_name: w.display_name.clone(),
                logo_url: w.logo_url.clone(),
                accent_color: w.accent_color.clone(),
            },
            allowed_redirects: w.allow_list().iter().map(ToString::to_string).collect(),
            success_redirect: w.success_redirect.clone(),
            created_at: from_millis(w.created_at),
            version: w.updated_at,
        }
    }
}

impl WorkspaceView {
    /// The version as an entity tag (`ETag`, and what `If-Match` compares with).
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }
}

/// Input of [`create`].
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWorkspace {
    /// The agency's name.
    #[schema(max_length = 200)]
    pub name: String,
    /// Unique URL-friendly name; made from the name when absent.
    pub slug: Option<String>,
    /// Client-facing branding.
    #[serde(default)]
    pub branding: Option<Branding>,
    /// Allowed success-redirect URLs.
    #[serde(default)]
    pub allowed_redirects: Option<Vec<String>>,
    /// Default success redirect for links without their own (must be in the allow-list).
    #[serde(default)]
    pub success_redirect: Option<String>,
}

/// Input of [`update`]: absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceUpdate {
    /// New name.
    #[schema(max_length = 200)]
    pub name: Option<String>,
    /// New branding (replaces the whole branding object).
    pub branding: Option<Branding>,
    /// New allow-list (replaces the whole list).
    pub allowed_redirects: Option<Vec<String>>,
    /// New default success redirect (must be in the allow-list); `""` removes it.
    pub success_redirect: Option<String>,
}

fn validate_branding(errors: &mut Errors, b: &Branding) -> (Option<String>, Option<String>, Option<String>) {
    let display = errors
        .take(domain::parse_optional_label("branding.display_name", b.display_name.as_deref()))
        .flatten();
    let logo = match b.logo_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(u) => errors.take(domain::parse_web_url("branding.logo_url", u).map(|u| u.to_string())),
    };
    let accent = match b.accent_color.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(c) => errors.take(
            domain::parse_accent_color(c).map_err(|e| FieldError::new("branding.accent_color", e.message)),
        ),
    };
    (display, logo, accent)
}

/// Fetches the logo at `url` (already validated as a web URL), if any, once every other field
/// is valid (a request that is refused anyway makes no outbound request); what is wrong with it
/// goes into `errors`.
async fn fetch_logo(app: &App, errors: &mut Errors, url: Option<&str>) -> Option<db::workspaces::LogoRow> {
    if !errors.is_empty() {
        return None;
    }
    let url = url::Url::parse(url?).ok()?;
    errors.take(super::logos::fetch(app, &url).await)
}

/// The default success redirect `value` (`""`: none), checked against the allow-list `allowed`
/// (as [`validate_allow_list`] stores it).
fn validate_success_redirect(errors: &mut Errors, value: &str, allowed: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let list: Vec<url::Url> = serde_json::from_str::<Vec<String>>(allowed)
        .unwrap_or_default()
        .iter()
        .filter_map(|s| url::Url::parse(s).ok())
        .collect();
    errors.take(
        domain::parse_success_redirect(value, &list)
            .map(|u| u.to_string())
            .map_err(|e| FieldError::new("success_redirect", e.message)),
    )
}

fn validate_allow_list(errors: &mut Errors, list: &[String]) -> String {
    if list.len() > 20 {
        errors.push(FieldError::new("allowed_redirects", "at most 20 entries"));
    }
    let parsed: Vec<String> = list
        .iter()
        .filter_map(|u| errors.take(domain::parse_allowed_redirect(u)))
        .map(|u| u.to_string())
        .collect();
    serde_json::Value::from(parsed).to_string()
}

/// Creates a workspace. Only platform admins (and the CLI) may.
pub async fn create(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    input: NewWorkspace,
) -> ServiceResult<WorkspaceView> {
    if *scope != Scope::Admin {
        return Err(ServiceError::Forbidden("only platform admins can create workspaces"));
    }
    let mut errors = Errors::default();
    let name = errors.take(domain::parse_label("name", &input.name));
    let slug = match input.slug.as_deref() {
        Some(s) => errors.take(domain::parse_slug(s)),
        None => name.as_deref().map(domain::slugify),
    };
    let (display_name, logo_url, accent_color) =
        validate_branding(&mut errors, &input.branding.unwrap_or_default());
    let allowed = validate_allow_list(&mut errors, &input.allowed_redirects.unwrap_or_default());
    let success_redirect =
        input.success_redirect.as_deref().and_then(|u| validate_success_redirect(&mut errors, u, &allowed));
    let logo = fetch_logo(app, &mut errors, logo_url.as_deref()).await;
    errors.finish()?;
    let (Some(name), Some(slug)) = (name, slug) else {
        return Err(ServiceError::Validation(vec![FieldError::new("name", "is invalid")]));
    };
    let now = app.now_ms();
    let row = WorkspaceRow {
        id: new_id(),
        name,
        slug,
        display_name,
        logo_url,
        logo_sha256: logo.as_ref().map(|l| l.sha256.clone()),
        accent_color,
        allowed_redirects: allowed,
        success_redirect,
        created_at: now,
        updated_at: now,
    };
    let mut tx = app.db.begin_write().await?;
    match db::workspaces::insert(&mut tx, &row).await {
        Err(DbError::Conflict(_)) => {
            return Err(ServiceError::Validation(vec![FieldError::new(
                "slug",
                format!("`{}` is already taken", row.slug),
            )]));
        }
        other => other?,
    }
    if let Some(logo) = &logo {
        db::workspaces::put_logo(&mut tx, &row.id, logo).await?;
    }
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.id),
        "workspace.created",
        "workspace",
        &row.id,
        serde_json::json!({"name": row.name, "slug": row.slug}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(workspace_id = %row.id, slug = %row.slug, "workspace created");
    Ok(WorkspaceView::from(&row))
}

/// Loads a workspace the caller may see, by id (or slug).
/// The workspace a new object goes into: the `workspace_id` field when given (id or slug), else
/// the caller's own workspace. A platform-admin caller must name one (`missing` says so), and a
/// workspace the caller cannot see is reported on the field, like one that does not exist.
pub async fn for_new_object(
    app: &App,
    scope: &Scope,
    requested: Option<&str>,
    missing: &'static str,
) -> ServiceResult<WorkspaceRow> {
    let key = match (requested, scope) {
        (Some(w), _) => w,
        (None, Scope::Workspace(w)) => w.as_str(),
        (None, Scope::Admin) => return Err(FieldError::new("workspace_id", missing).into()),
    };
    match get_row(app, scope, key).await {
        Err(ServiceError::NotFound(_)) => Err(FieldError::new("workspace_id", "no such workspace").into()),
        other => other,
    }
}

pub async fn get_row(app: &App, scope: &Scope, key: &str) -> ServiceResult<WorkspaceRow> {
    let mut conn = app.db.read().await?;
    match db::workspaces::get_by_id_or_slug(&mut conn, key).await? {
        Some(w) if scope.allows(&w.id) => Ok(w),
        _ => Err(ServiceError::NotFound("workspace")),
    }
}

/// One workspace.
pub async fn get(app: &App, scope: &Scope, key: &str) -> ServiceResult<WorkspaceView> {
    Ok(WorkspaceView::from(&get_row(app, scope, key).await?))
}

/// Workspaces visible to the caller, in creation order.
pub async fn list(
    app: &App,
    scope: &Scope,
    after: Option<&str>,
    limit: i64,
) -> ServiceResult<Vec<WorkspaceView>> {
    let mut conn = app.db.read().await?;
    let rows = db::workspaces::list(&mut conn, scope.workspace(), after, limit).await?;
    Ok(rows.iter().map(WorkspaceView::from).collect())
}

/// Updates name, branding or allow-list. With `based_on` (the versions the caller's change may
/// apply to: an `If-Match` header's, the version a form was shown with), a valid change to a
/// workspace at another version is refused with [`ServiceError::Stale`] before anything is
/// fetched or written.
pub async fn update(
    app: &App,
    actor: &Actor,
    scope: &Scope,
    key: &str,
    input: WorkspaceUpdate,
    based_on: Option<&[i64]>,
) -> ServiceResult<WorkspaceView> {
    let mut row = get_row(app, scope, key).await?;
    let read_version = row.updated_at;
    let old_logo_url = row.logo_url.clone();
    let mut errors = Errors::default();
    if let Some(name) = &input.name
        && let Some(n) = errors.take(domain::parse_label("name", name))
    {
        row.name = n;
    }
    if let Some(b) = &input.branding {
        let (d, l, a) = validate_branding(&mut errors, b);
        row.display_name = d;
        row.logo_url = l;
        row.accent_color = a;
    }
    if let Some(list) = &input.allowed_redirects {
        row.allowed_redirects = validate_allow_list(&mut errors, list);
    }
    if let Some(u) = &input.success_redirect {
        row.success_redirect = validate_success_redirect(&mut errors, u, &row.allowed_redirects);
    } else if let (Some(_), Some(current)) = (&input.allowed_redirects, row.success_redirect.clone()) {
        // A new allow-list must still allow the default it keeps.
        let mut check = Errors::default();
        validate_success_redirect(&mut check, &current, &row.allowed_redirects);
        if check.finish().is_err() {
            errors.push(FieldError::new(
                "success_redirect",
                "the workspace's default success redirect is not in the new allowed_redirects; change or clear it in the same request",
            ));
        }
    }
    // A change made from another version is refused once the request itself is known to be
    // valid (so that the caller learns first what to correct), before anything is fetched.
    if based_on.is_some_and(|versions| !versions.contains(&read_version)) {
        errors.finish()?;
        return Err(ServiceError::Stale(
            "the workspace was changed by someone else since the version this change was made from".into(),
        ));
    }
    // Branding that names a new logo URL (or one whose copy was never taken, set before copies
    // were kept) fetches it; the same URL keeps its copy; no branding leaves the logo alone.
    let logo = match (&input.branding, &row.logo_url) {
        (Some(_), Some(_)) if row.logo_url != old_logo_url || row.logo_sha256.is_none() => {
            fetch_logo(app, &mut errors, row.logo_url.as_deref()).await
        }
        _ => None,
    };
    errors.finish()?;
    let now = app.now_ms();
    // Never the instant the row was read: then the version check below could not tell them apart.
    row.updated_at = now.max(read_version + 1);
    if let Some(l) = &logo {
        row.logo_sha256 = Some(l.sha256.clone());
    } else if row.logo_url.is_none() {
        row.logo_sha256 = None;
    }
    let mut tx = app.db.begin_write().await?;
    // Written only over the version read: an update that ran meanwhile (a logo fetch takes up to
    // ten seconds) would otherwise be undone, and the logo copy and its name could disagree.
    if !db::workspaces::update(&mut tx, &row, read_version).await? {
        return Err(ServiceError::Conflict(
            "the workspace was changed by someone else meanwhile; load it again and repeat the change".into(),
        ));
    }
    match &logo {
        Some(l) => db::workspaces::put_logo(&mut tx, &row.id, l).await?,
        None if row.logo_url.is_none() => db::workspaces::delete_logo(&mut tx, &row.id).await?,
        None => {}
    }
    audit::record(
        &mut tx,
        now,
        actor,
        Some(&row.id),
        "workspace.updated",
        "workspace",
        &row.id,
        serde_json::json!({
            "name": input.name.is_some(),
            "branding": input.branding.is_some(),
            "allowed_redirects": input.allowed_redirects.is_some(),
            "success_redirect": input.success_redirect.is_some(),
            "logo_fetched": logo.is_some(),
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(WorkspaceView::from(&row))
}
