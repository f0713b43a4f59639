//! The heartbeat of `serve` and `worker` processes. Each records itself in the `processes` table
//! with the master key it seals new values with when it starts, again every [`BEAT`], and
//! removes itself when it stops. A process seen within [`LIVE_MS`] counts as running: `keys
//! rewrap` does not retire the key it seals with (a value it sealed after the retirement would
//! need a key the operator is about to remove), and `keys status` lists it. A process that was
//! killed counts as running until then. Times are the wall clock, never the sandbox's test clock,
//! which other processes do not share.

use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use crate::clock::{from_millis, to_millis};
use crate::db::processes::ProcessRow;
use crate::db::{self, DbResult, new_id};
use crate::state::App;

/// How often a process records its heartbeat.
pub const BEAT: Duration = Duration::from_secs(30);

/// How long after its last heartbeat a process still counts as running: three heartbeats.
pub const LIVE_MS: i64 = 90_000;

/// How long after its last heartbeat a process that never said it stopped is forgotten.
const FORGET_MS: i64 = 86_400_000;

/// Now, on the wall clock (ms).
pub fn wall_ms() -> i64 {
    to_millis(OffsetDateTime::now_utc())
}

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
    /// `p` as seen at `now` (wall-clock ms).
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

/// Whether `p` counts as running at `now` (wall-clock ms).
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
    let now = wall_ms();
    let row = ProcessRow {
        id: new_id(),
        role: role.to_string(),
        host: host_name(),
        pid: i64::from(std::process::id()),
        active_kid: app.keys.active_kid().to_string(),
        started_at: now,
        seen_at: now,
    };
    let mut conn = app.db.writer().await?;
    db::processes::insert(&mut conn, &row).await?;
    let forgotten = db::processes::purge(&mut conn, now - FORGET_MS).await?;
    if forgotten > 0 {
        tracing::info!(processes = forgotten, "processes silent for a day forgotten");
    }
    Ok(row)
}

/// Records a heartbeat every [`BEAT`] until `stop` (a record forgotten meanwhile, after a day
/// without a heartbeat, is made again).
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
        row.seen_at = wall_ms();
        let beat = async {
            let mut conn = app.db.writer().await?;
            if !db::processes::beat(&mut conn, &row.id, row.seen_at).await? {
                db::processes::insert(&mut conn, &row).await?;
            }
            Ok::<_, db::DbError>(())
        }
        .await;
        if let Err(e) = beat {
            tracing::warn!(error = %e, "could not record this process's heartbeat");
        }
    }
}

/// Removes this process's record (it is stopping).
pub async fn deregister(app: &App, id: &str) {
    let removed = async { db::processes::remove(&mut *app.db.writer().await?, id).await }.await;
    if let Err(e) = removed {
        tracing::warn!(error = %e, "could not remove this process's record; it is forgotten after 90 s");
    }
}

/// Every recorded process, as seen now.
pub async fn list(app: &App) -> DbResult<Vec<ProcessView>> {
    let now = wall_ms();
    let rows = db::processes::all(&mut *app.db.read().await?).await?;
    Ok(rows.iter().map(|p| ProcessView::of(p, now)).collect())
}
