//! The `links` table: reusable auth links. The token is stored as its SHA-256 (for lookup) and
//! sealed (so members can copy the link again), never in plain text.

use std::sync::LazyLock;

use sqlx::{AnyConnection, FromRow, Row};

use super::DbResult;
use super::stmt::{Exec, from_lite, stmt};
use super::workspaces::WorkspaceRow;

/// A link as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LinkRow {
    /// Id (UUIDv7).
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// Normally the client's name.
    pub label: String,
    /// The agency's own reference for the client.
    pub client_ref: Option<String>,
    /// Comma-separated platforms offered.
    pub platforms: String,
    /// Expiry (ms), if any.
    pub expires_at: Option<i64>,
    /// Most successful connections, if limited.
    pub max_uses: Option<i64>,
    /// Success redirect, if any.
    pub redirect_url: Option<String>,
    /// SHA-256 hex of the token.
    pub token_hash: String,
    /// The token, sealed for `links/<id>/token`.
    pub token_sealed: String,
    /// Who created it (`cli`, `api_key:<id>`, `user:<id>`).
    pub created_by: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
    /// When its token was last rotated.
    pub rotated_at: Option<i64>,
    /// Last successful connection through it.
    pub last_used_at: Option<i64>,
    /// Successful connections through it.
    pub use_count: i64,
    /// 1: the landing page does not list the accounts connected through the link.
    pub hide_connections: i64,
}

from_lite!(LinkRow {
    id,
    workspace_id,
    label,
    client_ref,
    platforms,
    expires_at,
    max_uses,
    redirect_url,
    token_hash,
    token_sealed,
    created_by,
    created_at,
    updated_at,
    revoked_at,
    rotated_at,
    last_used_at,
    use_count,
    hide_connections
});

const COLUMNS: &str = "id, workspace_id, label, client_ref, platforms, expires_at, max_uses, redirect_url, \
    token_hash, token_sealed, created_by, created_at, updated_at, revoked_at, rotated_at, last_used_at, use_count, \
    hide_connections";

/// Inserts a link.
pub async fn insert(conn: &mut AnyConnection, l: &LinkRow) -> DbResult<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO links ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
    )))
    .bind(&l.id)
    .bind(&l.workspace_id)
    .bind(&l.label)
    .bind(&l.client_ref)
    .bind(&l.platforms)
    .bind(l.expires_at)
    .bind(l.max_uses)
    .bind(&l.redirect_url)
    .bind(&l.token_hash)
    .bind(&l.token_sealed)
    .bind(&l.created_by)
    .bind(l.created_at)
    .bind(l.updated_at)
    .bind(l.revoked_at)
    .bind(l.rotated_at)
    .bind(l.last_used_at)
    .bind(l.use_count)
    .bind(l.hide_connections)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes the editable fields and the token columns of `l`.
pub async fn update(conn: &mut AnyConnection, l: &LinkRow) -> DbResult<()> {
    sqlx::query(
        "UPDATE links SET label = $2, client_ref = $3, platforms = $4, expires_at = $5, max_uses = $6, \
         redirect_url = $7, token_hash = $8, token_sealed = $9, updated_at = $10, revoked_at = $11, rotated_at = $12, \
         hide_connections = $13 WHERE id = $1",
    )
    .bind(&l.id)
    .bind(&l.label)
    .bind(&l.client_ref)
    .bind(&l.platforms)
    .bind(l.expires_at)
    .bind(l.max_uses)
    .bind(&l.redirect_url)
    .bind(&l.token_hash)
    .bind(&l.token_sealed)
    .bind(l.updated_at)
    .bind(l.revoked_at)
    .bind(l.rotated_at)
    .bind(l.hide_connections)
    .execute(conn)
    .await?;
    Ok(())
}

/// How a flow was started from its link: when, and with which of the link's URLs.
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    /// When (ms).
    pub at_ms: i64,
    /// The SHA-256 hex of the token it was started with; `None` for a flow started before that
    /// was recorded, judged by the time of the link's last rotation instead.
    pub token_hash: Option<&'a str>,
}

impl Start<'_> {
    /// Whether `link` was rotated since: its URL is no longer the one the flow was started with.
    /// By the token itself, not by time: a start that read the link while a rotation was being
    /// committed (or on a host whose clock runs ahead) still used the old URL.
    pub fn rotated_since(&self, link: &LinkRow) -> bool {
        match self.token_hash {
            Some(hash) => hash != link.token_hash,
            None => link.rotated_at.is_some_and(|at| at >= self.at_ms),
        }
    }
}

/// The SQL condition of [`Start::rotated_since`] being false, for `$3` the start's time and `$4`
/// its token hash.
const NOT_ROTATED_SINCE: &str = "COALESCE(token_hash = $4, rotated_at IS NULL OR rotated_at < $3)";

/// Counts one more successful connection through the link if it can still be used at `now_ms`
/// by a flow started as `start` says (not revoked, not expired, not used up, and not rotated
/// since: a flow started with the old URL dies with it); returns the link as it now stands, or
/// `None` when it cannot (nothing is written then). In the connection's own transaction, so that
/// a link revoked or rotated while the client was at the provider, or the last use taken by
/// another tab, stops the connection.
pub async fn record_use(
    conn: &mut impl Exec,
    id: &str,
    now_ms: i64,
    start: Start<'_>,
) -> DbResult<Option<LinkRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE links SET use_count = use_count + 1, last_used_at = $2 WHERE id = $1 \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2) \
             AND {NOT_ROTATED_SINCE} \
             AND (max_uses IS NULL OR use_count < max_uses) RETURNING {COLUMNS}"
        )
    });
    conn.fetch_optional(&stmt!(&SQL, id, now_ms, start.at_ms, start.token_hash)).await
}

/// Counts a repair through a link that is used up: an account it connected before connects
/// again. Only while the link is neither revoked nor expired at `now_ms`, nor rotated since
/// `start`; returns the link as it
/// now stands, or `None` (nothing written). Its use count may then pass `max_uses`, which limits
/// the accounts a link connects, never the repair of one of them.
pub async fn record_repair(
    conn: &mut impl Exec,
    id: &str,
    now_ms: i64,
    start: Start<'_>,
) -> DbResult<Option<LinkRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE links SET use_count = use_count + 1, last_used_at = $2 WHERE id = $1 \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2) \
             AND {NOT_ROTATED_SINCE} RETURNING {COLUMNS}"
        )
    });
    conn.fetch_optional(&stmt!(&SQL, id, now_ms, start.at_ms, start.token_hash)).await
}

/// [`get`] in a write transaction that will change the link: locked until the transaction ends
/// on PostgreSQL (SQLite's write transactions already are exclusive), so that an edit, a
/// revocation and a rotation made at once apply one after the other instead of one undoing
/// another (a revoked link brought back by an edit of its label, say).
pub async fn get_for_update(
    conn: &mut AnyConnection,
    backend: super::Backend,
    id: &str,
) -> DbResult<Option<LinkRow>> {
    let lock = if backend == super::Backend::Postgres { " FOR UPDATE" } else { "" };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM links WHERE id = $1{lock}")))
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

/// One link by id.
pub async fn get(conn: &mut impl Exec, id: &str) -> DbResult<Option<LinkRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {COLUMNS} FROM links WHERE id = $1"));
    conn.fetch_optional(&stmt!(&SQL, id)).await
}

from_lite!(PublicLinkRow {
    id,
    workspace_id,
    label,
    platforms,
    expires_at,
    max_uses,
    revoked_at,
    use_count,
    hide_connections,
    workspace_name,
    workspace_display_name,
    workspace_updated_at,
    workspace_logo_sha256
});

/// What the public landing page needs of a link and its workspace: no more, because every column
/// read is copied twice on its way from SQLite, and this page is the one opened most.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PublicLinkRow {
    /// Link id.
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// Normally the client's name.
    pub label: String,
    /// Comma-separated platforms offered.
    pub platforms: String,
    /// Expiry (ms), if any.
    pub expires_at: Option<i64>,
    /// Most successful connections, if limited.
    pub max_uses: Option<i64>,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
    /// Successful connections through it.
    pub use_count: i64,
    /// 1: the page does not list the accounts connected through the link.
    pub hide_connections: i64,
    /// The workspace's name.
    pub workspace_name: String,
    /// The name clients see, if set.
    pub workspace_display_name: Option<String>,
    /// The workspace's last change (ms): the version of its brand stylesheet.
    pub workspace_updated_at: i64,
    /// The SHA-256 of the workspace's logo copy, if it has one.
    pub workspace_logo_sha256: Option<String>,
}

/// [`PublicLinkRow`] by the SHA-256 of the link's token.
pub async fn public_by_token_hash(conn: &mut impl Exec, hash: &str) -> DbResult<Option<PublicLinkRow>> {
    const SQL: &str = "SELECT l.id, l.workspace_id, l.label, l.platforms, l.expires_at, l.max_uses, l.revoked_at, \
        l.use_count, l.hide_connections, w.name AS workspace_name, w.display_name AS workspace_display_name, \
        w.updated_at AS workspace_updated_at, w.logo_sha256 AS workspace_logo_sha256 \
        FROM links l JOIN workspaces w ON w.id = l.workspace_id WHERE l.token_hash = $1";
    conn.fetch_optional(&stmt!(SQL, hash)).await
}

/// One link by the SHA-256 of its token, with its workspace, in one query: what the start of a
/// connect flow needs.
pub async fn get_with_workspace_by_token_hash(
    conn: &mut impl Exec,
    hash: &str,
) -> DbResult<Option<(LinkRow, WorkspaceRow)>> {
    with_workspace(conn, &WITH_WORKSPACE_BY_TOKEN_HASH, hash).await
}

/// One link by id, with its workspace, in one query.
pub async fn get_with_workspace(conn: &mut impl Exec, id: &str) -> DbResult<Option<(LinkRow, WorkspaceRow)>> {
    with_workspace(conn, &WITH_WORKSPACE_BY_ID, id).await
}

// Built once: the landing page runs one of them on every request.
static WITH_WORKSPACE_BY_ID: LazyLock<String> = LazyLock::new(|| with_workspace_sql("id"));
static WITH_WORKSPACE_BY_TOKEN_HASH: LazyLock<String> = LazyLock::new(|| with_workspace_sql("token_hash"));

async fn with_workspace(
    conn: &mut impl Exec,
    sql: &str,
    value: &str,
) -> DbResult<Option<(LinkRow, WorkspaceRow)>> {
    let row: Option<WithWorkspace> = conn.fetch_optional(&stmt!(sql, value)).await?;
    Ok(row.map(|WithWorkspace(link, workspace)| (link, workspace)))
}

/// A row of [`with_workspace_sql`]: the link's columns, then its workspace's (but the id).
struct WithWorkspace(LinkRow, WorkspaceRow);

impl FromRow<'_, sqlx::any::AnyRow> for WithWorkspace {
    fn from_row(row: &sqlx::any::AnyRow) -> sqlx::Result<Self> {
        let link = LinkRow::from_row(row)?;
        let workspace = WorkspaceRow {
            id: link.workspace_id.clone(),
            name: row.try_get("w_name")?,
            slug: row.try_get("w_slug")?,
            display_name: row.try_get("w_display_name")?,
            logo_url: row.try_get("w_logo_url")?,
            logo_sha256: row.try_get("w_logo_sha256")?,
            accent_color: row.try_get("w_accent_color")?,
            allowed_redirects: row.try_get("w_allowed_redirects")?,
            success_redirect: row.try_get("w_success_redirect")?,
            created_at: row.try_get("w_created_at")?,
            updated_at: row.try_get("w_updated_at")?,
        };
        Ok(Self(link, workspace))
    }
}

impl super::stmt::FromLite for WithWorkspace {
    const COLUMNS: usize = LinkRow::COLUMNS + 10;

    fn from_lite_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self> {
        let link = LinkRow::from_lite_at(row, first)?;
        let at = first + LinkRow::COLUMNS;
        let workspace = WorkspaceRow {
            id: link.workspace_id.clone(),
            name: row.get(at)?,
            slug: row.get(at + 1)?,
            display_name: row.get(at + 2)?,
            logo_url: row.get(at + 3)?,
            accent_color: row.get(at + 4)?,
            allowed_redirects: row.get(at + 5)?,
            success_redirect: row.get(at + 6)?,
            created_at: row.get(at + 7)?,
            updated_at: row.get(at + 8)?,
            logo_sha256: row.get(at + 9)?,
        };
        Ok(Self(link, workspace))
    }
}

fn with_workspace_sql(key: &str) -> String {
    let link_columns = COLUMNS.split(", ").map(|c| format!("l.{c}")).collect::<Vec<_>>().join(", ");
    format!(
        "SELECT {link_columns}, w.name AS w_name, w.slug AS w_slug, w.display_name AS w_display_name, \
         w.logo_url AS w_logo_url, w.accent_color AS w_accent_color, w.allowed_redirects AS w_allowed_redirects, \
         w.success_redirect AS w_success_redirect, w.created_at AS w_created_at, w.updated_at AS w_updated_at, \
         w.logo_sha256 AS w_logo_sha256 FROM links l JOIN workspaces w ON w.id = l.workspace_id WHERE l.{key} = $1"
    )
}

/// Filters for [`list`].
#[derive(Debug, Default, Clone)]
pub struct LinkFilter<'a> {
    /// Only this workspace (platform-admin listings may span workspaces).
    pub workspace_id: Option<&'a str>,
    /// Case-insensitive substring of the label or client reference.
    pub search: Option<&'a str>,
    /// Only links that are not revoked (`Some(true)`) or only revoked ones (`Some(false)`).
    pub active: Option<bool>,
    /// Links older than this id (the cursor).
    pub before: Option<&'a str>,
}

/// Newest first, one page. The search is a case-insensitive substring of the label or the client
/// reference, for every alphabet: on PostgreSQL `LOWER(..) LIKE`; on SQLite, whose `LOWER()` and
/// `LIKE` fold ASCII letters only, a `GLOB` pattern that offers each letter in both cases (see
/// [`glob_contains`]).
pub async fn list(conn: &mut AnyConnection, f: &LinkFilter<'_>, limit: i64) -> DbResult<Vec<LinkRow>> {
    let sqlite = conn.backend_name().eq_ignore_ascii_case("sqlite");
    let (search, matches) = if sqlite {
        (f.search.map(glob_contains), "label GLOB $2 OR COALESCE(client_ref, '') GLOB $2")
    } else {
        (
            f.search.map(like_contains),
            "LOWER(label) LIKE $2 ESCAPE '\\' OR LOWER(COALESCE(client_ref, '')) LIKE $2 ESCAPE '\\'",
        )
    };
    let active: Option<i64> = f.active.map(i64::from);
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM links WHERE ($1 IS NULL OR workspace_id = $1) \
         AND ($2 IS NULL OR {matches}) \
         AND ($3 IS NULL OR ($3 = 1 AND revoked_at IS NULL) OR ($3 = 0 AND revoked_at IS NOT NULL)) \
         AND ($4 IS NULL OR id < $4) ORDER BY id DESC LIMIT $5"
    )))
    .bind(f.workspace_id)
    .bind(search)
    .bind(active)
    .bind(f.before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// A PostgreSQL `LIKE … ESCAPE '\\'` pattern matching `search` anywhere, case-insensitively:
/// `%`, `_` and the escape character itself match literally.
pub fn like_contains(search: &str) -> String {
    let lower = search.to_lowercase();
    format!("%{}%", lower.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"))
}

/// A SQLite `GLOB` pattern matching text that contains `search`, ignoring case: each character
/// with other case forms becomes a class of them (`é` → `[éÉ]`), `*`, `?` and `[` are matched
/// literally, and the rest as they are. Case forms that are more than one character (`ß` → `SS`)
/// are left out, as PostgreSQL's `LOWER()`, which maps character by character, leaves them.
pub fn glob_contains(search: &str) -> String {
    fn single(mut forms: impl Iterator<Item = char>) -> Option<char> {
        let first = forms.next()?;
        forms.next().is_none().then_some(first)
    }
    let mut out = String::from("*");
    for c in search.chars() {
        let mut class = vec![c];
        for form in [single(c.to_lowercase()), single(c.to_uppercase())].into_iter().flatten() {
            if !class.contains(&form) {
                class.push(form);
            }
        }
        if matches!(c, '*' | '?' | '[') || class.len() > 1 {
            out.push('[');
            out.extend(class);
            out.push(']');
        } else {
            out.push(c);
        }
    }
    out.push('*');
    out
}

#[cfg(test)]
mod tests {
    use super::glob_contains;

    #[test]
    fn like_patterns_match_specials_literally() {
        assert_eq!(super::like_contains(r"A\b%_c"), r"%a\\b\%\_c%");
    }

    #[test]
    fn glob_patterns_offer_both_cases_and_match_specials_literally() {
        assert_eq!(glob_contains("Éa1"), "*[Éé][aA]1*");
        assert_eq!(glob_contains("*?[-]"), "*[*][?][[]-]*");
        // A case form of more than one character is left out: `ß` stays itself.
        assert_eq!(glob_contains("ß"), "*ß*");
        assert_eq!(glob_contains(""), "**");
    }
}
