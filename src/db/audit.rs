//! The `audit_log` table: who changed what, when. Append-only.

use sqlx::AnyConnection;

use super::DbResult;
use super::stmt::{Exec, stmt};

/// An audit entry as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// Id (UUIDv7, so entries sort by time).
    pub id: String,
    /// The workspace concerned (none for platform-wide changes).
    pub workspace_id: Option<String>,
    /// `api_key`, `cli`, `user`, `client` or `system`.
    pub actor_kind: String,
    /// The API key id or user id, when there is one.
    pub actor_id: Option<String>,
    /// What happened, e.g. `link.created`.
    pub action: String,
    /// The kind of the changed object, e.g. `link`.
    pub target_kind: String,
    /// Its id.
    pub target_id: String,
    /// JSON details (never secrets).
    pub details: String,
    /// When (ms).
    pub created_at: i64,
}

/// Appends an entry.
pub async fn insert(conn: &mut impl Exec, a: &AuditRow) -> DbResult<()> {
    const SQL: &str = "INSERT INTO audit_log (id, workspace_id, actor_kind, actor_id, action, target_kind, \
        target_id, details, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
    let s = stmt!(
        SQL,
        &a.id,
        &a.workspace_id,
        &a.actor_kind,
        &a.actor_id,
        &a.action,
        &a.target_kind,
        &a.target_id,
        &a.details,
        a.created_at,
    );
    conn.execute(&s).await?;
    Ok(())
}

/// Filters for [`list`].
#[derive(Debug, Default, Clone)]
pub struct AuditFilter<'a> {
    /// Only this workspace.
    pub workspace_id: Option<&'a str>,
    /// Only this action.
    pub action: Option<&'a str>,
    /// Only this target.
    pub target_id: Option<&'a str>,
    /// Entries older than this id (the cursor).
    pub before: Option<&'a str>,
}

/// The statement of [`list`] and its text parameters (the page size is bound after them).
///
/// Only the filters given become conditions (rather than `($1 IS NULL OR …)`), so that the
/// engine can walk an index in id order and stop after one page, however long the log:
/// `(workspace_id, id)`, `(workspace_id, action, id)` for an action, `(target_id, id)` for an
/// object. An object has few entries, so with both an object and an action the action is only
/// a filter on the object's entries, written so that SQLite (which has no statistics to tell)
/// does not walk every entry of a common action instead.
pub fn list_sql(f: &AuditFilter<'_>) -> (String, Vec<String>) {
    let mut sql = String::from(
        "SELECT id, workspace_id, actor_kind, actor_id, action, target_kind, target_id, details, created_at \
         FROM audit_log WHERE 1 = 1",
    );
    let mut params: Vec<String> = Vec::new();
    let mut placeholder = |value: &str| {
        params.push(value.to_string());
        format!("${}", params.len())
    };
    if let Some(w) = f.workspace_id {
        sql.push_str(&format!(" AND workspace_id = {}", placeholder(w)));
    }
    if let Some(t) = f.target_id {
        sql.push_str(&format!(" AND target_id = {}", placeholder(t)));
    }
    match (f.action, f.target_id) {
        (Some(a), None) => sql.push_str(&format!(" AND action = {}", placeholder(a))),
        (Some(a), Some(_)) => {
            let a = placeholder(a);
            sql.push_str(&format!(" AND ({a} IS NULL OR action = {a})"));
        }
        (None, _) => {}
    }
    if let Some(b) = f.before {
        sql.push_str(&format!(" AND id < {}", placeholder(b)));
    }
    let limit = params.len() + 1;
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${limit}"));
    (sql, params)
}

/// Newest first, one page.
pub async fn list(conn: &mut AnyConnection, f: &AuditFilter<'_>, limit: i64) -> DbResult<Vec<AuditRow>> {
    let (sql, params) = list_sql(f);
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
    fn only_the_filters_given_become_conditions() {
        let (sql, params) = list_sql(&AuditFilter { workspace_id: Some("w"), ..Default::default() });
        assert!(sql.ends_with("WHERE 1 = 1 AND workspace_id = $1 ORDER BY id DESC LIMIT $2"), "{sql}");
        assert_eq!(params, ["w"]);
        let (sql, params) = list_sql(&AuditFilter {
            workspace_id: Some("w"),
            action: Some("link.revoked"),
            before: Some("b"),
            ..Default::default()
        });
        assert!(
            sql.ends_with("workspace_id = $1 AND action = $2 AND id < $3 ORDER BY id DESC LIMIT $4"),
            "{sql}"
        );
        assert_eq!(params, ["w", "link.revoked", "b"]);
        let (sql, params) = list_sql(&AuditFilter {
            workspace_id: None,
            action: Some("link.revoked"),
            target_id: Some("t"),
            before: None,
        });
        assert!(
            sql.ends_with("target_id = $1 AND ($2 IS NULL OR action = $2) ORDER BY id DESC LIMIT $3"),
            "{sql}"
        );
        assert_eq!(params, ["t", "link.revoked"]);
    }
}
