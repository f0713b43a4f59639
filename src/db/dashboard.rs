//! Read-only queries behind the dashboard pages: the overview's counts (from the counters that
//! triggers keep, see [`CONNECTION_COUNTS_SQL`]) and the connection list with its filters and
//! handle search.
//!
//! The list reads only the columns a listing shows, into its own row type, so that columns added
//! to `connections` for other features do not concern it. Every query is keyset-paginated and
//! served by an index in the order of the page: newest first on the time-ordered id, and a
//! handle search (by the start of the handle) in handle order; see [`connections_sql`].

use sqlx::AnyConnection;

use super::{Backend, DbResult};

/// How many connections of a workspace have one (provider, status) pair.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StatusCount {
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// `active`, `broken` or `disconnected`.
    pub status: String,
    /// How many.
    pub n: i64,
}

/// The statement of [`connection_counts`] (`$1`: the workspace). It reads the counters that
/// triggers keep in step with `connections` (migration 0006): a handful of rows, however many
/// connections the workspace has, where counting them would read one index entry each.
pub const CONNECTION_COUNTS_SQL: &str =
    "SELECT provider, status, n FROM connection_counts WHERE workspace_id = $1 ORDER BY provider, status";

/// Connections of a workspace grouped by provider and status.
pub async fn connection_counts(conn: &mut AnyConnection, workspace_id: &str) -> DbResult<Vec<StatusCount>> {
    Ok(sqlx::query_as(CONNECTION_COUNTS_SQL).bind(workspace_id).fetch_all(conn).await?)
}

/// Connections of every workspace by provider and status: `(provider, status, count)`.
pub async fn connection_totals(conn: &mut AnyConnection) -> DbResult<Vec<(String, String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT provider, status, CAST(SUM(n) AS BIGINT) FROM connection_counts GROUP BY provider, status \
         ORDER BY provider, status",
    )
    .fetch_all(conn)
    .await?)
}

/// Links of a workspace that are not revoked.
pub async fn unrevoked_link_count(conn: &mut AnyConnection, workspace_id: &str) -> DbResult<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM links WHERE workspace_id = $1 AND revoked_at IS NULL")
            .bind(workspace_id)
            .fetch_one(conn)
            .await?;
    Ok(n)
}

/// A connection as a listing shows it (never a token).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConnectionItem {
    /// Id.
    pub id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// The link it was last connected through.
    pub link_id: Option<String>,
    /// `tiktok` or `instagram`.
    pub provider: String,
    /// The provider's account id.
    pub provider_account_id: String,
    /// Handle.
    pub username: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// `active`, `broken` or `disconnected`.
    pub status: String,
    /// Why it is broken or disconnected.
    pub status_reason: Option<String>,
    /// 1 when made against the sandbox.
    pub sandbox: i64,
    /// First connection (ms).
    pub connected_at: i64,
    /// Access token expiry (ms).
    pub access_expires_at: Option<i64>,
    /// Last change (ms).
    pub updated_at: i64,
}

/// Filters of [`connections`].
#[derive(Debug, Default, Clone)]
pub struct ConnectionSearch<'a> {
    /// Only this workspace (`None`: every workspace, for the platform admins' search).
    pub workspace_id: Option<&'a str>,
    /// Only this status.
    pub status: Option<&'a str>,
    /// Only this provider.
    pub provider: Option<&'a str>,
    /// Only handles that start with this text (see [`handle_prefix`]). A search lists its
    /// results in the order of the handle rather than newest first.
    pub search: Option<&'a str>,
    /// The cursor: the id of the last connection of the previous page. Newest first, the page
    /// holds older connections; with a search, the connections after it in handle order.
    pub cursor: Option<&'a str>,
}

/// What a handle search looks for: the text without a leading `@`, lower-cased, or `None` when
/// nothing is left. Only ASCII letters are folded, as SQLite's `lower()` does; TikTok and
/// Instagram handles are ASCII.
pub fn handle_prefix(search: &str) -> Option<String> {
    let prefix = search.trim().trim_start_matches('@').trim().to_ascii_lowercase();
    (!prefix.is_empty()).then_some(prefix)
}

/// The least string that is greater than every string starting with `prefix`, in code point
/// (= UTF-8 byte) order; `None` when there is none (the prefix is all `char::MAX`).
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 + 1 {
            0xD800 => 0xE000,
            n => n,
        };
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The lower-cased handle in byte order. On SQLite `lower(username)` compares bytewise
/// (`BINARY`); on PostgreSQL the database's collation may be a linguistic one, under which a
/// prefix is not a range, so the expression (and its indexes) use the `C` collation.
fn handle_key(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "lower(username)",
        Backend::Postgres => "lower(username) COLLATE \"C\"",
    }
}

/// The statement of [`connections`] and its text parameters (the page size is bound after
/// them); public so that the dashboard benchmark can show the plan of the exact statement.
/// `cursor_handle` is the lower-cased handle of the cursor's connection, for a search.
///
/// Only the filters given become conditions (rather than `($1 IS NULL OR …)`), so that each
/// query can walk one index in the order of the page and stop after one page:
/// - newest first: `(workspace_id, id)`, `(workspace_id, status, id)` or
///   `(workspace_id, provider, id)`, backwards from the cursor;
/// - a handle search: the range of handles that start with the text in
///   `(workspace_id, lower(username), id)` (for the admins' search across workspaces,
///   `(lower(username), id)`), forwards from the cursor. Ordering a search newest first
///   instead would make the engine read and sort every match of a short prefix.
pub fn connections_sql(
    backend: Backend,
    f: &ConnectionSearch<'_>,
    cursor_handle: Option<&str>,
) -> (String, Vec<String>) {
    let mut sql = String::from(
        "SELECT id, workspace_id, link_id, provider, provider_account_id, username, display_name, status, \
         status_reason, sandbox, connected_at, access_expires_at, updated_at FROM connections WHERE 1 = 1",
    );
    let mut params: Vec<String> = Vec::new();
    let mut placeholder = |value: String| {
        params.push(value);
        format!("${}", params.len())
    };
    if let Some(w) = f.workspace_id {
        sql.push_str(&format!(" AND workspace_id = {}", placeholder(w.to_string())));
    }
    if let Some(s) = f.status {
        sql.push_str(&format!(" AND status = {}", placeholder(s.to_string())));
    }
    if let Some(p) = f.provider {
        sql.push_str(&format!(" AND provider = {}", placeholder(p.to_string())));
    }
    let order = match f.search.and_then(handle_prefix) {
        Some(prefix) => {
            let key = handle_key(backend);
            let upper = prefix_upper_bound(&prefix);
            let cursor = f.cursor.zip(cursor_handle);
            // Start at the cursor's handle when it is past the prefix (it normally is).
            let lower = match cursor {
                Some((_, h)) if h > prefix.as_str() => h.to_string(),
                _ => prefix,
            };
            sql.push_str(&format!(" AND {key} >= {}", placeholder(lower)));
            if let Some(upper) = upper {
                sql.push_str(&format!(" AND {key} < {}", placeholder(upper)));
            }
            if let Some((id, h)) = cursor {
                let h = placeholder(h.to_string());
                let id = placeholder(id.to_string());
                sql.push_str(&format!(" AND ({key} > {h} OR id > {id})"));
            }
            format!("{key}, id")
        }
        None => {
            if let Some(b) = f.cursor {
                sql.push_str(&format!(" AND id < {}", placeholder(b.to_string())));
            }
            "id DESC".to_string()
        }
    };
    let limit = params.len() + 1;
    sql.push_str(&format!(" ORDER BY {order} LIMIT ${limit}"));
    (sql, params)
}

/// One page of connections: newest first, or, with a search, in handle order.
pub async fn connections(
    conn: &mut AnyConnection,
    backend: Backend,
    f: &ConnectionSearch<'_>,
    limit: i64,
) -> DbResult<Vec<ConnectionItem>> {
    let searching = f.search.and_then(handle_prefix).is_some();
    // A search page continues after the cursor's handle; a cursor that names no connection
    // with a handle (an edited URL) starts from the first result.
    let cursor_handle = match f.cursor {
        // Only a connection the listing could show: another workspace's connection given as the
        // cursor must not tell where its handle sorts (nor that it exists).
        Some(id) if searching => {
            let key = handle_key(backend);
            let row: Option<(Option<String>,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {key} FROM connections WHERE id = $1 AND ($2 IS NULL OR workspace_id = $2)"
            )))
            .bind(id)
            .bind(f.workspace_id)
            .fetch_optional(&mut *conn)
            .await?;
            row.and_then(|(h,)| h)
        }
        _ => None,
    };
    let (sql, params) = connections_sql(backend, f, cursor_handle.as_deref());
    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
    for p in params {
        query = query.bind(p);
    }
    Ok(query.bind(limit).fetch_all(conn).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_prefix_ignores_the_at_sign_and_case() {
        assert_eq!(handle_prefix("  @Sunny.Cafe "), Some("sunny.cafe".into()));
        assert_eq!(handle_prefix("SANDBOX.CREA"), Some("sandbox.crea".into()));
        assert_eq!(handle_prefix("@"), None);
        assert_eq!(handle_prefix("   "), None);
    }

    #[test]
    fn upper_bound_is_the_next_prefix() {
        assert_eq!(prefix_upper_bound("sun").as_deref(), Some("suo"));
        assert_eq!(prefix_upper_bound("a_").as_deref(), Some("a`"));
        assert_eq!(prefix_upper_bound("z\u{D7FF}").as_deref(), Some("z\u{E000}"));
        assert_eq!(prefix_upper_bound("y\u{10FFFF}").as_deref(), Some("z"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
        for s in ["sun", "sunny", "sun.z", "sun\u{10FFFF}x"] {
            assert!(("sun".."suo").contains(&s), "{s}");
        }
        for s in ["su", "sum.z", "suo", "suoa"] {
            assert!(!("sun".."suo").contains(&s), "{s}");
        }
    }

    #[test]
    fn a_search_pages_in_handle_order_from_the_cursor() {
        let f = ConnectionSearch {
            workspace_id: Some("w"),
            search: Some("@Sun"),
            cursor: Some("c"),
            ..Default::default()
        };
        let (sql, params) = connections_sql(Backend::Sqlite, &f, Some("sunny.cafe"));
        assert!(sql.ends_with(
            "workspace_id = $1 AND lower(username) >= $2 AND lower(username) < $3 \
             AND (lower(username) > $4 OR id > $5) ORDER BY lower(username), id LIMIT $6"
        ));
        assert_eq!(params, ["w", "sunny.cafe", "suo", "sunny.cafe", "c"]);
        let (sql, _) = connections_sql(Backend::Postgres, &f, None);
        assert!(sql.ends_with(
            "lower(username) COLLATE \"C\" >= $2 AND lower(username) COLLATE \"C\" < $3 \
             ORDER BY lower(username) COLLATE \"C\", id LIMIT $4"
        ));
        let newest = ConnectionSearch { workspace_id: Some("w"), cursor: Some("c"), ..Default::default() };
        let (sql, _) = connections_sql(Backend::Sqlite, &newest, None);
        assert!(sql.ends_with("workspace_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"));
    }
}
