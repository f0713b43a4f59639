//! Master key rotation: which keys the stored values are sealed with, and re-sealing them with
//! the active key so that earlier keys can be retired.
//!
//! The procedure (README, "Rotating the master key"): configure the new key as `master_key` and
//! the old one in `retired_master_keys`, restart every process, run `authlink keys rewrap`, then
//! remove the old key once `authlink keys status` shows it retired. A re-wrap replaces each value
//! only if it is unchanged since it was read (compare-and-set), so it may run while the service
//! serves and refreshes: a value rewritten meanwhile was sealed by its writer.

use serde::Serialize;

use super::processes::ProcessView;
use super::{Actor, ServiceResult, audit};
use crate::clock::{from_millis, to_millis};
use crate::crypto::{Aad, ENVELOPE_VERSION};
use crate::db::key_checks::KeyCheck;
use crate::db::sealed::{self, SEALED_COLUMNS, SealedColumn};
use crate::db::{self, Db};
use crate::state::App;

/// Rows re-sealed per transaction unless the caller says otherwise.
pub const DEFAULT_BATCH: u32 = 500;

/// A key that sealed data in this database, or one configured now.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    /// The key id (derived from the key; reveals nothing about it).
    pub kid: String,
    /// `active` (seals new values), `decrypt-only` (configured in `retired_master_keys`) or
    /// `not configured`.
    pub configured: &'static str,
    /// When the key first sealed data here (absent for a configured key that never did).
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_used_at: Option<time::OffsetDateTime>,
    /// When a re-wrap found no value sealed with the key any more; it may then be removed from
    /// the configuration.
    #[serde(with = "time::serde::rfc3339::option")]
    pub retired_at: Option<time::OffsetDateTime>,
}

/// How many values of one column one key sealed in one envelope.
#[derive(Debug, Clone, Serialize)]
pub struct SealedCount {
    /// The table.
    pub table: &'static str,
    /// The column.
    pub column: &'static str,
    /// The key id named by the values (empty for values that are not envelopes).
    pub kid: String,
    /// The envelope: `v2` (the current one, bound to the workspace too), `v1` (from before
    /// that; `authlink keys rewrap` moves them to `v2`), empty for values that are none.
    pub envelope: String,
    /// How many.
    pub count: i64,
}

/// `authlink keys status`.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    /// The key that seals new values.
    pub active_kid: String,
    /// Every key known to the database or the configuration.
    pub keys: Vec<KeyView>,
    /// Stored sealed values by column and key.
    pub sealed: Vec<SealedCount>,
    /// The `serve` and `worker` processes recorded, with the key each seals with.
    pub processes: Vec<ProcessView>,
}

/// An earlier key a re-wrap did not retire because running processes still seal with it.
#[derive(Debug, Clone, Serialize)]
pub struct HeldKey {
    /// The key.
    pub kid: String,
    /// The processes that seal with it.
    pub processes: Vec<ProcessView>,
}

/// A value a re-wrap could not open: left as it is and reported.
#[derive(Debug, Clone, Serialize)]
pub struct Unreadable {
    /// The table.
    pub table: &'static str,
    /// The column.
    pub column: &'static str,
    /// The row.
    pub id: String,
    /// Why (no secret: "sealed with key … which is not configured", "failed authentication", …).
    pub error: String,
}

/// What a re-wrap did to one column.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnReport {
    /// The table.
    pub table: &'static str,
    /// The column.
    pub column: &'static str,
    /// Values sealed again with the active key.
    pub resealed: u64,
    /// Values changed by their writer between the read and the write (already sealed anew).
    pub changed_meanwhile: u64,
    /// Values that could not be opened.
    pub unreadable: u64,
}

/// `authlink keys rewrap`.
#[derive(Debug, Clone, Serialize)]
pub struct RewrapReport {
    /// The key every value is now sealed with.
    pub active_kid: String,
    /// Per column.
    pub columns: Vec<ColumnReport>,
    /// Values that could not be opened (at most 100 listed).
    pub unreadable: Vec<Unreadable>,
    /// Values still sealed with another key after the run, by column and key: values that could
    /// not be opened, or written meanwhile by a process that still seals with an old key.
    pub remaining: Vec<SealedCount>,
    /// Keys this run retired: no stored value is sealed with them any more.
    pub retired: Vec<String>,
    /// Earlier keys no stored value needs, not retired because running processes still seal
    /// with them: restart those with the new configuration, then re-wrap again.
    pub held: Vec<HeldKey>,
}

impl RewrapReport {
    /// Values sealed again in all.
    pub fn resealed(&self) -> u64 {
        self.columns.iter().map(|c| c.resealed).sum()
    }

    /// Whether every stored value is now sealed with the active key, and every earlier key
    /// retired.
    pub fn complete(&self) -> bool {
        self.remaining.is_empty() && self.held.is_empty()
    }
}

/// Counts the stored sealed values by column and key.
async fn count_sealed(db: &Db) -> ServiceResult<Vec<SealedCount>> {
    count_sealed_on(&mut *db.read().await?).await
}

async fn count_sealed_on(conn: &mut sqlx::AnyConnection) -> ServiceResult<Vec<SealedCount>> {
    let mut out = Vec::new();
    for col in SEALED_COLUMNS {
        for (envelope, kid, count) in sealed::count_by_kid(&mut *conn, col).await? {
            out.push(SealedCount { table: col.table, column: col.column, kid, envelope, count });
        }
    }
    Ok(out)
}

/// The keys of the database and of the configuration, and the sealed values by key.
pub async fn status(app: &App) -> ServiceResult<KeyStatus> {
    let checks = db::key_checks::all(&mut *app.db.read().await?).await?;
    let configured = |kid: &str| {
        if kid == app.keys.active_kid() {
            "active"
        } else if app.keys.has_kid(kid) {
            "decrypt-only"
        } else {
            "not configured"
        }
    };
    let mut keys: Vec<KeyView> = checks
        .iter()
        .map(|c: &KeyCheck| KeyView {
            kid: c.kid.clone(),
            configured: configured(&c.kid),
            first_used_at: Some(from_millis(c.created_at)),
            retired_at: c.retired_at.map(from_millis),
        })
        .collect();
    for kid in std::iter::once(app.keys.active_kid()).chain(app.keys.retired_kids()) {
        if !keys.iter().any(|k| k.kid == kid) {
            keys.push(KeyView {
                kid: kid.to_string(),
                configured: configured(kid),
                first_used_at: None,
                retired_at: None,
            });
        }
    }
    Ok(KeyStatus {
        active_kid: app.keys.active_kid().to_string(),
        keys,
        sealed: count_sealed(&app.db).await?,
        processes: super::processes::list(app).await?,
    })
}

/// Seals every stored value that is not sealed with the active key again with it, `batch` rows
/// per transaction, then retires every earlier key no value is sealed with any more.
pub async fn rewrap(app: &App, actor: &Actor, batch: u32) -> ServiceResult<RewrapReport> {
    let active = app.keys.active_kid().to_string();
    let limit = i64::from(batch.max(1));
    let mut columns = Vec::new();
    let mut unreadable = Vec::new();
    for col in SEALED_COLUMNS {
        let mut report = ColumnReport {
            table: col.table,
            column: col.column,
            resealed: 0,
            changed_meanwhile: 0,
            unreadable: 0,
        };
        let mut after = String::new();
        loop {
            let page =
                sealed::page_not_sealed_with(&mut *app.db.read().await?, col, &active, &after, limit).await?;
            let Some((last, _, _)) = page.last() else { break };
            after = last.clone();
            let mut updates = Vec::with_capacity(page.len());
            for (id, workspace, old) in page {
                match app.keys.rewrap(&old, Aad::new(&workspace, col.table, &id, col.aad_column)) {
                    Ok(Some(new)) => updates.push((id, old, new)),
                    Ok(None) => {}
                    Err(e) => {
                        report.unreadable += 1;
                        tracing::warn!(table = col.table, column = col.column, id = %id, error = %e,
                            "a sealed value cannot be opened; left as it is");
                        if unreadable.len() < 100 {
                            unreadable.push(Unreadable {
                                table: col.table,
                                column: col.column,
                                id,
                                error: e.to_string(),
                            });
                        }
                    }
                }
            }
            if !updates.is_empty() {
                let (resealed, changed) = app.db.write(move |db| replace_all(db, col, updates)).await?;
                report.resealed += resealed;
                report.changed_meanwhile += changed;
            }
        }
        tracing::info!(
            table = col.table,
            column = col.column,
            resealed = report.resealed,
            changed_meanwhile = report.changed_meanwhile,
            unreadable = report.unreadable,
            "column re-wrapped"
        );
        columns.push(report);
    }

    // Counted in a write transaction, which follows every write before it. Counted on a pooled
    // SQLite reader, a value this run had replaced was once (under load) reported as left, as
    // if read from a snapshot older than the replacement.
    let mut tx = app.db.begin_write().await?;
    let counted = count_sealed_on(&mut tx).await?;
    tx.commit().await?;
    let remaining: Vec<SealedCount> =
        counted.into_iter().filter(|c| c.kid != active || c.envelope != ENVELOPE_VERSION).collect();
    let now_ms = to_millis(app.clock.now());
    let resealed: u64 = columns.iter().map(|c| c.resealed).sum();
    let summary = serde_json::json!({
        "active_kid": active,
        "resealed": resealed,
        "unreadable": columns.iter().map(|c| c.unreadable).sum::<u64>(),
        "remaining": remaining.iter().map(|c| c.count).sum::<i64>(),
    });
    let still_used: Vec<String> = remaining.iter().map(|c| c.kid.clone()).collect();
    let (retired, held) = app
        .db
        .on_writer(retire_unused(app.db.clone(), actor.clone(), active.clone(), still_used, summary, now_ms))
        .await??;
    for kid in &retired {
        tracing::info!(kid = %kid, "key retired: no stored value is sealed with it any more");
    }
    for h in &held {
        tracing::warn!(kid = %h.kid, processes = h.processes.len(),
            "key not retired: running processes still seal with it");
    }
    Ok(RewrapReport { active_kid: active, columns, unreadable, remaining, retired, held })
}

/// Replaces each value that is still the one read: `(replaced, changed meanwhile)`.
async fn replace_all(
    db: Db,
    col: &'static SealedColumn,
    updates: Vec<(String, String, String)>,
) -> db::DbResult<(u64, u64)> {
    let mut tx = db.begin_write().await?;
    let replaced = sealed::replace_unchanged(&mut tx, col, &updates).await?;
    tx.commit().await?;
    Ok((replaced, updates.len() as u64 - replaced))
}

/// Marks retired every key (other than `active`) with a key check that no value names any more
/// and no running process seals with, and records the re-wrap and each retirement in the audit
/// log. Returns the keys retired now, and those running processes hold.
async fn retire_unused(
    db: Db,
    actor: Actor,
    active: String,
    still_used: Vec<String>,
    summary: serde_json::Value,
    now_ms: i64,
) -> ServiceResult<(Vec<String>, Vec<HeldKey>)> {
    let mut tx = db.begin_write().await?;
    // One at a time with processes starting (which may make a key active again).
    db::key_checks::lock(&mut tx, db.backend()).await?;
    // Counted again in the transaction that retires: a value written with an old key since the
    // count above keeps that key.
    let mut in_use = still_used;
    for col in SEALED_COLUMNS {
        for (_, kid, count) in sealed::count_by_kid(&mut tx, col).await? {
            if count > 0 && !in_use.contains(&kid) {
                in_use.push(kid);
            }
        }
    }
    let wall = db::processes::db_now_ms(&mut tx, db.backend()).await?;
    let running: Vec<ProcessView> = db::processes::all(&mut tx)
        .await?
        .iter()
        .filter(|p| super::processes::is_running(p, wall))
        .map(|p| ProcessView::of(p, wall))
        .collect();
    let mut retired = Vec::new();
    let mut held = Vec::new();
    for check in db::key_checks::all(&mut tx).await? {
        if check.kid == active || check.retired_at.is_some() || in_use.contains(&check.kid) {
            continue;
        }
        let sealing: Vec<ProcessView> =
            running.iter().filter(|p| p.active_kid == check.kid).cloned().collect();
        if !sealing.is_empty() {
            held.push(HeldKey { kid: check.kid, processes: sealing });
            continue;
        }
        db::key_checks::set_retired(&mut tx, &check.kid, Some(now_ms)).await?;
        audit::record(&mut tx, now_ms, &actor, None, "key.retired", "key", &check.kid, serde_json::json!({}))
            .await?;
        retired.push(check.kid);
    }
    audit::record(&mut tx, now_ms, &actor, None, "keys.rewrapped", "key", &active, summary).await?;
    tx.commit().await?;
    Ok((retired, held))
}
