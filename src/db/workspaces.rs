//! The `workspaces` table: one row per agency (tenant).

use sqlx::AnyConnection;
use url::Url;

use super::DbResult;
use super::stmt::{Exec, from_lite, stmt};

/// A workspace as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkspaceRow {
    /// Id (UUIDv7).
    pub id: String,
    /// The agency's name.
    pub name: String,
    /// Unique URL-friendly name.
    pub slug: String,
    /// Name shown to clients (falls back to `name`).
    pub display_name: Option<String>,
    /// Where the logo was taken from (the agency's own URL).
    pub logo_url: Option<String>,
    /// The SHA-256 of the copy of the logo that client pages show (`workspace_logos`), if any.
    pub logo_sha256: Option<String>,
    /// `#rrggbb` accent colour of client pages.
    pub accent_color: Option<String>,
    /// JSON array of allowed success-redirect URLs.
    pub allowed_redirects: String,
    /// Where the success page offers to send clients whose link names no redirect of its own.
    pub success_redirect: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

impl WorkspaceRow {
    /// The parsed allow-list (entries that fail to parse are skipped; they were validated on write).
    pub fn allow_list(&self) -> Vec<Url> {
        serde_json::from_str::<Vec<String>>(&self.allowed_redirects)
            .unwrap_or_default()
            .iter()
            .filter_map(|s| Url::parse(s).ok())
            .collect()
    }

    /// The name clients see.
    pub fn public_name(&self) -> &str {
        self.display_name.as_deref().unwrap_or(&self.name)
    }
}

from_lite!(WorkspaceRow {
    id,
    name,
    slug,
    display_name,
    logo_url,
    logo_sha256,
    accent_color,
    allowed_redirects,
    success_redirect,
    created_at,
    updated_at
});

const COLUMNS: &str = "id, name, slug, display_name, logo_url, logo_sha256, accent_color, allowed_redirects, \
                       success_redirect, created_at, updated_at";

/// Inserts a workspace.
pub async fn insert(conn: &mut AnyConnection, w: &WorkspaceRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO workspaces (id, name, slug, display_name, logo_url, accent_color, allowed_redirects, \
         success_redirect, created_at, updated_at, logo_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&w.id)
    .bind(&w.name)
    .bind(&w.slug)
    .bind(&w.display_name)
    .bind(&w.logo_url)
    .bind(&w.accent_color)
    .bind(&w.allowed_redirects)
    .bind(&w.success_redirect)
    .bind(w.created_at)
    .bind(w.updated_at)
    .bind(&w.logo_sha256)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes every mutable field of `w` over the row as it was at `read_version` (its `updated_at`
/// when read); `false`, with nothing written, when it has changed since.
pub async fn update(conn: &mut AnyConnection, w: &WorkspaceRow, read_version: i64) -> DbResult<bool> {
    let done = sqlx::query(
        "UPDATE workspaces SET name = $2, slug = $3, display_name = $4, logo_url = $5, accent_color = $6, \
         allowed_redirects = $7, success_redirect = $8, updated_at = $9, logo_sha256 = $10 \
         WHERE id = $1 AND updated_at = $11",
    )
    .bind(&w.id)
    .bind(&w.name)
    .bind(&w.slug)
    .bind(&w.display_name)
    .bind(&w.logo_url)
    .bind(&w.accent_color)
    .bind(&w.allowed_redirects)
    .bind(&w.success_redirect)
    .bind(w.updated_at)
    .bind(&w.logo_sha256)
    .bind(read_version)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One workspace by id.
pub async fn get(conn: &mut impl Exec, id: &str) -> DbResult<Option<WorkspaceRow>> {
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("SELECT {COLUMNS} FROM workspaces WHERE id = $1"));
    conn.fetch_optional(&stmt!(&SQL, id)).await
}

/// One workspace by id or slug.
pub async fn get_by_id_or_slug(conn: &mut AnyConnection, key: &str) -> DbResult<Option<WorkspaceRow>> {
    // Neither an id nor a slug (a slug is letters, digits and dashes): nothing to look up, and
    // nothing PostgreSQL would refuse (text with NUL in it) reaches it.
    if !super::is_id(key) && crate::domain::parse_slug(key).ok().as_deref() != Some(key) {
        return Ok(None);
    }
    // (The id first, should a slug made before slugs were refused that shape be another's id.)
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM workspaces WHERE id = $1 OR slug = $1 ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END LIMIT 1"
    )))
        .bind(key)
        .fetch_optional(conn)
        .await?)
}

/// A page of workspaces in creation order, after the cursor id, optionally only `only`.
pub async fn list(
    conn: &mut AnyConnection,
    only: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> DbResult<Vec<WorkspaceRow>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM workspaces WHERE ($1 IS NULL OR id = $1) AND ($2 IS NULL OR id > $2) \
         ORDER BY id LIMIT $3"
    )))
    .bind(only)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// A copy of a workspace's logo, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LogoRow {
    /// The SHA-256 of `bytes`, hex: the name of the copy in its URL.
    pub sha256: String,
    /// `image/png`, `image/jpeg`, `image/gif` or `image/webp`, as read from the bytes.
    pub content_type: String,
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// The image.
    pub bytes: Vec<u8>,
    /// When it was fetched (ms).
    pub fetched_at: i64,
}

/// Stores `logo` as the workspace's logo, in place of any other.
pub async fn put_logo(conn: &mut AnyConnection, workspace_id: &str, logo: &LogoRow) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO workspace_logos (workspace_id, sha256, content_type, width, height, bytes, fetched_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (workspace_id) DO UPDATE SET sha256 = excluded.sha256, \
         content_type = excluded.content_type, width = excluded.width, height = excluded.height, \
         bytes = excluded.bytes, fetched_at = excluded.fetched_at",
    )
    .bind(workspace_id)
    .bind(&logo.sha256)
    .bind(&logo.content_type)
    .bind(logo.width)
    .bind(logo.height)
    .bind(&logo.bytes)
    .bind(logo.fetched_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the workspace's logo, if it has one.
pub async fn delete_logo(conn: &mut AnyConnection, workspace_id: &str) -> DbResult<()> {
    sqlx::query("DELETE FROM workspace_logos WHERE workspace_id = $1")
        .bind(workspace_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The workspace's logo, if it has one and its SHA-256 is `sha256`.
pub async fn get_logo(
    conn: &mut AnyConnection,
    workspace_id: &str,
    sha256: &str,
) -> DbResult<Option<LogoRow>> {
    Ok(sqlx::query_as(
        "SELECT sha256, content_type, width, height, bytes, fetched_at FROM workspace_logos \
         WHERE workspace_id = $1 AND sha256 = $2",
    )
    .bind(workspace_id)
    .bind(sha256)
    .fetch_optional(conn)
    .await?)
}
