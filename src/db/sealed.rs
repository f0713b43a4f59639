//! Every column that holds a sealed value (`v2:<kid>:<nonce>:<ciphertext>`, or `v1:…` from before
//! the workspace was part of the associated data), for re-wrapping them under a new master key
//! (or into the current envelope) and counting them by key.
//!
//! Table and column names come from [`SEALED_COLUMNS`] only, never from input, so the statements
//! below can name them directly. An empty value is an erased one (a removed webhook endpoint's
//! secret, the PKCE verifier of an attempt that ended): nothing to open, re-wrap or count.

use sqlx::AnyConnection;

use super::DbResult;
use crate::crypto::{ENVELOPE_VERSION, KID_LEN};

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

/// Every sealed column, each in a table with `id` and `workspace_id`. The associated data of a
/// value is (workspace id, table, row id, `aad_column`).
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

/// The `LIKE` pattern of every envelope of the current version sealed with `kid` (key ids are
/// hex: no wildcards).
pub fn kid_pattern(kid: &str) -> String {
    format!("{ENVELOPE_VERSION}:{kid}:%")
}

/// How many values of `col` each key sealed in each envelope: `(envelope, kid, count)`, where
/// `envelope` is `v1` or `v2` and `kid` the envelope's second field (both `''` for a value that
/// is no envelope).
pub async fn count_by_kid(
    conn: &mut AnyConnection,
    col: &SealedColumn,
) -> DbResult<Vec<(String, String, i64)>> {
    let sql = format!(
        "SELECT {version} AS envelope, {kid} AS kid, COUNT(*) AS n FROM {t} WHERE {c} IS NOT NULL AND {c} <> '' \
         GROUP BY {version}, {kid} ORDER BY 2, 1",
        version = version_expr(col.column),
        kid = kid_expr(col.column),
        t = col.table,
        c = col.column,
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(conn).await?)
}

/// Whether a value is an envelope, in SQL.
pub(super) fn is_envelope(column: &str) -> String {
    format!("({column} LIKE 'v1:%' OR {column} LIKE 'v2:%')")
}

/// The envelope's version in SQL (`''` when the value is none).
fn version_expr(column: &str) -> String {
    format!("CASE WHEN {} THEN substr({column}, 1, 2) ELSE '' END", is_envelope(column))
}

/// The key id of an envelope in SQL: the [`KID_LEN`] characters after `v1:` or `v2:` (`''` when
/// the value is no envelope). Key ids have a fixed length, so `substr`, which both backends
/// have, finds them.
pub(super) fn kid_expr(column: &str) -> String {
    format!("CASE WHEN {} THEN substr({column}, 4, {KID_LEN}) ELSE '' END", is_envelope(column))
}

/// Up to `limit` rows of `col` after `after` (by id) whose value is not in the current envelope
/// sealed with `kid`: `(id, workspace id, envelope)`.
pub async fn page_not_sealed_with(
    conn: &mut AnyConnection,
    col: &SealedColumn,
    kid: &str,
    after: &str,
    limit: i64,
) -> DbResult<Vec<(String, String, String)>> {
    let sql = format!(
        "SELECT id, workspace_id, {c} FROM {t} WHERE id > $1 AND {c} IS NOT NULL AND {c} <> '' AND {c} NOT LIKE $2 \
         ORDER BY id LIMIT $3",
        c = col.column,
        t = col.table,
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(after)
        .bind(kid_pattern(kid))
        .bind(limit)
        .fetch_all(conn)
        .await?)
}

/// Rows replaced per statement by [`replace_unchanged`] (three parameters each).
const REPLACE_CHUNK: usize = 1000;

/// Replaces values of `col`: for each `(id, old, new)`, the row's value becomes `new` only if it
/// still holds `old` (a value changed meanwhile was sealed anew by its writer). One statement per
/// thousand rows. Returns how many were replaced.
pub async fn replace_unchanged(
    conn: &mut AnyConnection,
    col: &SealedColumn,
    rows: &[(String, String, String)],
) -> DbResult<u64> {
    let mut replaced = 0;
    for chunk in rows.chunks(REPLACE_CHUNK) {
        let values: Vec<String> =
            (0..chunk.len()).map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3)).collect();
        // `columnN` is how both SQLite and PostgreSQL name the columns of a VALUES list.
        let sql = format!(
            "UPDATE {t} SET {c} = v.column3 FROM (VALUES {values}) AS v \
             WHERE {t}.id = v.column1 AND {t}.{c} = v.column2",
            c = col.column,
            t = col.table,
            values = values.join(", "),
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, old, new) in chunk {
            query = query.bind(id).bind(old).bind(new);
        }
        replaced += query.execute(&mut *conn).await?.rows_affected();
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Only values still holding what was read are replaced, across statement chunks.
    #[tokio::test]
    async fn replace_unchanged_is_a_compare_and_set_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
        let col = SEALED_COLUMNS.iter().find(|c| c.table == "webhook_events").unwrap();
        let n = REPLACE_CHUNK * 2 + 7;
        let ids: Vec<String> = (0..n).map(|i| format!("e{i:05}")).collect();
        let mut tx = db.begin_write().await.unwrap();
        for id in &ids {
            sqlx::query(
                "INSERT INTO webhook_events (id, workspace_id, event_type, payload, created_at) \
                 VALUES ($1, 'w', 'test', $2, 0)",
            )
            .bind(id)
            .bind(format!("old-{id}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        // Every 10th row changed since it was read.
        let rows: Vec<(String, String, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let read = if i % 10 == 0 { "stale".to_string() } else { format!("old-{id}") };
                (id.clone(), read, format!("new-{id}"))
            })
            .collect();
        let replaced = replace_unchanged(&mut tx, col, &rows).await.unwrap();
        tx.commit().await.unwrap();
        let stale = n.div_ceil(10);
        assert_eq!(replaced as usize, n - stale);
        let values: Vec<(String, String)> =
            sqlx::query_as("SELECT id, payload FROM webhook_events ORDER BY id")
                .fetch_all(&mut *db.read().await.unwrap())
                .await
                .unwrap();
        for (i, (id, value)) in values.iter().enumerate() {
            let expected = if i % 10 == 0 { format!("old-{id}") } else { format!("new-{id}") };
            assert_eq!(value, &expected);
        }
    }

    /// Every column the migrations create for a sealed value (named `*_sealed`, plus the webhook
    /// payload) is in [`SEALED_COLUMNS`], so a re-wrap cannot miss one added later.
    #[tokio::test]
    async fn every_sealed_column_of_the_schema_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::test_sqlite_migrated(&dir).await;
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
