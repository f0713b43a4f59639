//! Every column that holds a sealed value (`v1:<kid>:<nonce>:<ciphertext>`), for re-wrapping
//! them under a new master key and counting them by key.
//!
//! Table and column names come from [`SEALED_COLUMNS`] only, never from input, so the statements
//! below can name them directly.

use sqlx::AnyConnection;

use super::DbResult;
use crate::crypto::KID_LEN;

/// A column of sealed values and the place its values are bound to (their associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedColumn {
    /// The table.
    pub table: &'static str,
    /// The column holding the envelope.
    pub column: &'static str,
    /// The column name the values are sealed for (the associated data's column part).
    pub aad_column: &'static str,
}

/// Every sealed column. The associated data of a value is (table, row id, `aad_column`).
pub const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn { table: "links", column: "token_sealed", aad_column: "token" },
    SealedColumn { table: "oauth_flows", column: "verifier_sealed", aad_column: "verifier" },
    SealedColumn { table: "connections", column: "access_token_sealed", aad_column: "access_token" },
    SealedColumn { table: "connections", column: "refresh_token_sealed", aad_column: "refresh_token" },
    SealedColumn { table: "webhook_endpoints", column: "secret_sealed", aad_column: "secret" },
    SealedColumn {
        table: "webhook_endpoints",
        column: "previous_secret_sealed",
        aad_column: "previous_secret",
    },
    SealedColumn { table: "webhook_events", column: "payload", aad_column: "payload" },
];

/// The `LIKE` pattern of every envelope sealed with `kid` (key ids are hex: no wildcards).
pub fn kid_pattern(kid: &str) -> String {
    format!("v1:{kid}:%")
}

/// How many values of `col` each key sealed: `(kid, count)`, where `kid` is the envelope's
/// second field (whatever it holds, for a malformed value).
pub async fn count_by_kid(conn: &mut AnyConnection, col: &SealedColumn) -> DbResult<Vec<(String, i64)>> {
    let sql = format!(
        "SELECT {kid} AS kid, COUNT(*) AS n FROM {t} WHERE {c} IS NOT NULL GROUP BY {kid} ORDER BY 1",
        kid = kid_expr(col.column),
        t = col.table,
        c = col.column,
    );
    Ok(sqlx::query_as(&sql).fetch_all(conn).await?)
}

/// The key id of an envelope in SQL: the [`KID_LEN`] characters after `v1:` (`''` when the value
/// does not start with `v1:`). Key ids have a fixed length, so `substr`, which both backends
/// have, finds them.
fn kid_expr(column: &str) -> String {
    format!("CASE WHEN {column} LIKE 'v1:%' THEN substr({column}, 4, {KID_LEN}) ELSE '' END")
}

/// Up to `limit` rows of `col` after `after` (by id) whose value is not sealed with `kid`:
/// `(id, envelope)`.
pub async fn page_not_sealed_with(
    conn: &mut AnyConnection,
    col: &SealedColumn,
    kid: &str,
    after: &str,
    limit: i64,
) -> DbResult<Vec<(String, String)>> {
    let sql = format!(
        "SELECT id, {c} FROM {t} WHERE id > $1 AND {c} IS NOT NULL AND {c} NOT LIKE $2 ORDER BY id LIMIT $3",
        c = col.column,
        t = col.table,
    );
    Ok(sqlx::query_as(&sql).bind(after).bind(kid_pattern(kid)).bind(limit).fetch_all(conn).await?)
}

/// Replaces the value of `col` in row `id` with `new`, only if it still holds `old` (a value
/// changed meanwhile was sealed anew by its writer). Whether it was replaced.
pub async fn replace(
    conn: &mut AnyConnection,
    col: &SealedColumn,
    id: &str,
    old: &str,
    new: &str,
) -> DbResult<bool> {
    let sql = format!("UPDATE {t} SET {c} = $1 WHERE id = $2 AND {c} = $3", c = col.column, t = col.table);
    let done = sqlx::query(&sql).bind(new).bind(id).bind(old).execute(conn).await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;
    use crate::config::DatabaseConfig;
    use crate::db::Db;

    /// Every column the migrations create for a sealed value (named `*_sealed`, plus the webhook
    /// payload) is in [`SEALED_COLUMNS`], so a re-wrap cannot miss one added later.
    #[tokio::test]
    async fn every_sealed_column_of_the_schema_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let url = SecretString::from(format!("sqlite://{}/t.db", dir.path().display()));
        let db =
            Db::connect(&url, &DatabaseConfig { max_connections: 2, acquire_timeout_secs: 2 }).await.unwrap();
        db.migrate().await.unwrap();
        let mut found: Vec<(String, String)> = sqlx::query_as(
            "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND (p.name LIKE '%\\_sealed' ESCAPE '\\' \
             OR (m.name = 'webhook_events' AND p.name = 'payload')) ORDER BY 1, 2",
        )
        .fetch_all(&mut *db.read().await.unwrap())
        .await
        .unwrap();
        let mut listed: Vec<(String, String)> =
            SEALED_COLUMNS.iter().map(|c| (c.table.to_string(), c.column.to_string())).collect();
        found.sort();
        listed.sort();
        assert_eq!(found, listed);
    }
}
