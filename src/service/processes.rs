//! The heartbeat of `serve` and `worker` processes. Each records itself in the `processes` table
//! with the master key it seals new values with when it starts, again every [`BEAT`], and
//! removes itself when it stops. A process seen within [`LIVE_MS`] counts as running: `keys
//! rewrap` does not retire the key it seals with (a value it sealed after the retirement would
//! need a key the operator is about to remove), and `keys status` lists it. A process that was
//! killed counts as running until then.
//!
//! Each record is written under the key checks' lock, like a retirement, and marks the process's
//! own key needed again if a re-wrap retired it meanwhile: a re-wrap that ran between this
//! process's key check and its first record, or while its heartbeats could not reach the
//! database, is undone (and logged) rather than leaving a key retired that values keep needing.
//! Times are the database's clock, so that the clocks of different hosts do not matter.

use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::clock::from_millis;
use crate::db::processes::ProcessRow;
use crate::db::{self, DbResult, new_id};
use crate::state::App;

/// How often a process records its heartbeat.
pub const BEAT: Duration = Duration::from_secs(30);

/// How long after its last heartbeat a process still counts as running: three heartbeats.
pub const LIVE_MS: i64 = 90_000;

/// How long after its last heartbeat a process that never said it stopped is forgotten.
const FORGET_MS: i64 = 86_400_000;

/// A process as `keys status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessView {
    /// Random id, new at every start.
    pub id: String,
    /// `serve` or `worker`.
    pub role: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: i64,
    /// The key it seals new values with.
    pub active_kid: String,
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// Its last heartbeat.
    #[serde(with = "time::serde::rfc3339")]
    pub seen_at: OffsetDateTime,
    /// Seen within the last [`LIVE_MS`]: counted as running.
    pub running: bool,
}

impl ProcessView {
    /// `p` as seen at `now` (the database's clock, ms).
    pub fn of(p: &ProcessRow, now: i64) -> Self {
        Self {
            id: p.id.clone(),
            role: p.role.clone(),
            host: p.host.clone(),
            pid: p.pid,
            active_kid: p.active_kid.clone(),
            started_at: from_millis(p.started_at),
            seen_at: from_millis(p.seen_at),
            running: is_running(p, now),
        }
    }

    /// `host pid N (role)`, for messages.
    pub fn describe(&self) -> String {
        format!("{} pid {} ({})", self.host, self.pid, self.role)
    }
}

/// Whether `p` counts as running at `now` (the database's clock, ms).
pub fn is_running(p: &ProcessRow, now: i64) -> bool {
    p.seen_at >= now - LIVE_MS
}

/// The name of this host: `HOSTNAME`, else the kernel's, else `unknown`.
fn host_name() -> String {
    let name = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().chars().filter(|c| !c.is_control()).take(255).collect::<String>())
        .filter(|h| !h.is_empty());
    name.unwrap_or_else(|| "unknown".into())
}

/// Records this process (`role`: `serve` or `worker`) and forgets processes silent for a day.
pub async fn register(app: &App, role: &str) -> DbResult<ProcessRow> {
    let mut row = ProcessRow {
        id: new_id(),
        role: role.to_string(),
        host: host_name(),
        pid: i64::from(std::process::id()),
        active_kid: app.keys.active_kid().to_string(),
        started_at: 0,
        seen_at: 0,
    };
    record(app, &mut row).await?;
    let mut conn = app.db.writer().await?;
    let forgotten = db::processes::purge(&mut conn, row.seen_at - FORGET_MS).await?;
    if forgotten > 0 {
        tracing::info!(processes = forgotten, "processes silent for a day forgotten");
    }
    Ok(row)
}

/// How far this host's clock may be from the database's before every heartbeat says so. Leases
/// are judged by each host's clock, and a refresh leaves 10 s of margin at its lease's end.
const CLOCK_SKEW_WARN_MS: i64 = 5_000;

/// Whether this host's clock was last found out of step with the database's (so that the warning
/// is given when that starts, and an all-clear when it ends, not at every heartbeat).
static CLOCK_SKEWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What to say of this host's clock read at `host_ms` against the database's read at `db_ms`
/// (`round_trip_ms` apart at most): a warning when they differ by more than
/// [`CLOCK_SKEW_WARN_MS`] beyond the round trip.
fn clock_skew(host_ms: i64, db_ms: i64, round_trip_ms: i64) -> Option<String> {
    let skew = host_ms - db_ms;
    (skew.abs() > CLOCK_SKEW_WARN_MS + round_trip_ms).then(|| {
        let (by, way) = (skew.abs() as f64 / 1000.0, if skew > 0 { "ahead of" } else { "behind" });
        format!(
            "this host's clock is {by:.1} s {way} the database's: refresh leases and other claims are timed by \
             each host's clock, so another process may take over work this one still does; synchronise the \
             hosts' clocks (NTP)"
        )
    })
}

/// Warns once when this host's clock and the database's drift apart, and says when they agree
/// again. The system clock is compared (not the application's, which the sandbox's control API
/// may move forward in tests and demos).
fn check_clock(db_ms: i64, asked: std::time::Instant) {
    use std::sync::atomic::Ordering;
    let host_ms = crate::clock::to_millis(OffsetDateTime::now_utc());
    let round_trip_ms = i64::try_from(asked.elapsed().as_millis()).unwrap_or(i64::MAX / 4);
    match clock_skew(host_ms, db_ms, round_trip_ms) {
        Some(message) => {
            if !CLOCK_SKEWED.swap(true, Ordering::Relaxed) {
                tracing::warn!(skew_ms = host_ms - db_ms, "{message}");
            }
        }
        None => {
            if CLOCK_SKEWED.swap(false, Ordering::Relaxed) {
                tracing::info!(
                    skew_ms = host_ms - db_ms,
                    "this host's clock agrees with the database's again"
                );
            }
        }
    }
}

/// Writes `row`'s heartbeat (its record, the first time or when it was forgotten), under the key
/// checks' lock, and marks its key needed again if a re-wrap retired it.
async fn record(app: &App, row: &mut ProcessRow) -> DbResult<()> {
    let backend = app.db.backend();
    let mut tx = app.db.begin_write().await?;
    db::key_checks::lock(&mut tx, backend).await?;
    let asked = std::time::Instant::now();
    let now = db::processes::db_now_ms(&mut tx, backend).await?;
    check_clock(now, asked);
    row.seen_at = now;
    if row.started_at == 0 {
        row.started_at = now;
    }
    if !db::processes::beat(&mut tx, &row.id, now).await? {
        db::processes::insert(&mut tx, row).await?;
    }
    let retired = db::key_checks::unretire(&mut tx, &row.active_kid).await?;
    // Retired and then forgotten by a process started without it, while this one's heartbeats
    // did not reach the database: recorded again, or the values this process seals from now on
    // would need a key the database no longer names.
    let forgotten =
        !retired && db::key_checks::insert(&mut tx, &row.active_kid, &app.keys.check_value(), now).await?;
    if retired || forgotten {
        tracing::error!(
            kid = %row.active_kid,
            "this process seals with a key that a re-wrap retired (it ran before this process was \
             recorded, or while its heartbeats did not reach the database); the key is marked needed \
             again: restart this process with the new configuration, then run `authlink keys rewrap` again"
        );
    }
    tx.commit().await?;
    Ok(())
}

/// Records a heartbeat every [`BEAT`] until `stop`.
pub async fn run(
    app: std::sync::Arc<App>,
    mut row: ProcessRow,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(BEAT);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if let Err(e) = record(&app, &mut row).await {
            tracing::warn!(error = %e, "could not record this process's heartbeat");
        }
    }
}

/// Removes this process's record (it is stopping).
pub async fn deregister(app: &App, id: &str) {
    let removed = async { db::processes::remove(&mut *app.db.writer().await?, id).await }.await;
    if let Err(e) = removed {
        tracing::warn!(error = %e, "could not remove this process's record; it counts as running for 90 s more");
    }
}

/// Every recorded process, as seen now.
pub async fn list(app: &App) -> DbResult<Vec<ProcessView>> {
    let mut conn = app.db.read().await?;
    let now = db::processes::db_now_ms(&mut conn, app.db.backend()).await?;
    let rows = db::processes::all(&mut conn).await?;
    Ok(rows.iter().map(|p| ProcessView::of(p, now)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host clock out of step with the database's by more than 5 s (beyond the round trip of
    /// the reading) is reported, with its direction; within that, nothing.
    #[test]
    fn clock_skew_is_judged_beyond_the_round_trip() {
        let db = 1_764_000_000_000;
        assert_eq!(clock_skew(db + 4_900, db, 0), None);
        assert_eq!(clock_skew(db - 5_000, db, 0), None);
        assert_eq!(clock_skew(db + 5_400, db, 500), None, "the round trip is allowed for");
        let ahead = clock_skew(db + 12_300, db, 10).unwrap();
        assert!(ahead.contains("12.3 s ahead of the database's"), "{ahead}");
        let behind = clock_skew(db - 7_000, db, 10).unwrap();
        assert!(behind.contains("7.0 s behind the database's"), "{behind}");
    }

    /// A heartbeat that finds its process's key retired (a re-wrap ran while it could not reach
    /// the database) marks it needed again; it also brings back a record forgotten meanwhile.
    #[tokio::test]
    async fn a_heartbeat_takes_back_a_retirement_of_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::startup::state_for_tests(dir.path()).await;
        let mut row = register(&app, "serve").await.unwrap();
        let retire = "UPDATE key_checks SET retired_at = 1";
        sqlx::query(sqlx::AssertSqlSafe(retire)).execute(&mut *app.db.writer().await.unwrap()).await.unwrap();
        sqlx::query("DELETE FROM processes").execute(&mut *app.db.writer().await.unwrap()).await.unwrap();

        record(&app, &mut row).await.unwrap();
        let checks = db::key_checks::all(&mut app.db.read().await.unwrap()).await.unwrap();
        let own = checks.iter().find(|c| c.kid == app.keys.active_kid()).unwrap();
        assert_eq!(own.retired_at, None, "needed again");
        let listed = list(&app).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].id.as_str(), listed[0].running), (row.id.as_str(), true));

        // Retired and then forgotten (by a process started without the key): recorded again,
        // with the check value that proves it.
        sqlx::query(sqlx::AssertSqlSafe(retire)).execute(&mut *app.db.writer().await.unwrap()).await.unwrap();
        db::key_checks::forget(&mut app.db.writer().await.unwrap(), app.keys.active_kid()).await.unwrap();
        assert!(db::key_checks::all(&mut app.db.read().await.unwrap()).await.unwrap().is_empty());
        record(&app, &mut row).await.unwrap();
        let checks = db::key_checks::all(&mut app.db.read().await.unwrap()).await.unwrap();
        let own = checks.iter().find(|c| c.kid == app.keys.active_kid()).expect("recorded again");
        assert_eq!(own.retired_at, None);
        assert!(app.keys.verify_check_value(&own.kid, &own.check_value));
    }
}
