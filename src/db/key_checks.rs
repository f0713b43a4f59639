//! The `key_checks` table: proof that the configured master key is the one the data was sealed
//! with.

use sqlx::AnyConnection;

use super::DbResult;

/// All stored `(kid, check_value)` pairs.
pub async fn all(conn: &mut AnyConnection) -> DbResult<Vec<(String, String)>> {
    Ok(sqlx::query_as("SELECT kid, check_value FROM key_checks ORDER BY created_at").fetch_all(conn).await?)
}

/// Records the check value of a key.
pub async fn insert(conn: &mut AnyConnection, kid: &str, check: &str, now_ms: i64) -> DbResult<()> {
    sqlx::query("INSERT INTO key_checks (kid, check_value, created_at) VALUES ($1, $2, $3)")
        .bind(kid)
        .bind(check)
        .bind(now_ms)
        .execute(conn)
        .await?;
    Ok(())
}
