//! Background jobs: the refresh scheduler, health checks, `connection.expiring` announcements
//! and webhook delivery. They run inside `serve` (unless `jobs.enabled = false`) and alone in
//! `authlink worker`; any number of processes may run them at once, because every unit of work
//! is claimed with a lease in the database.
//!
//! Work is taken in bounded batches, so memory stays flat whatever the number of connections,
//! and an idle scheduler costs one indexed query per tick.

pub mod deliver;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::service::refresh;
use crate::state::AppState;

/// Runs every job until `stop` turns true, then lets work in flight finish.
pub async fn run(state: AppState, stop: watch::Receiver<bool>) {
    tracing::info!(owner = refresh::owner_id(), "background jobs started");
    let mut tasks = JoinSet::new();
    let restart = Duration::from_secs(5);
    let (st, sp) = (state.clone(), stop.clone());
    tasks.spawn(supervised("refresh", stop.clone(), restart, move || refresh_loop(st.clone(), sp.clone())));
    let (st, sp) = (state.clone(), stop.clone());
    tasks.spawn(supervised("health checks", stop.clone(), restart, move || {
        check_loop(st.clone(), sp.clone())
    }));
    let (st, sp) = (state.clone(), stop.clone());
    tasks.spawn(supervised("expiry notices", stop.clone(), restart, move || {
        expiring_loop(st.clone(), sp.clone())
    }));
    let (st, sp) = (state.clone(), stop.clone());
    tasks.spawn(supervised("webhook delivery", stop.clone(), restart, move || {
        deliver::run(st.clone(), sp.clone())
    }));
    tasks.spawn(warn_of_connections_not_served(state.clone()));
    while tasks.join_next().await.is_some() {}
    tracing::info!("background jobs stopped");
}

/// Says once, at start, how many active connections this process leaves alone because their
/// provider runs here in the other mode (see [`Providers::served`](crate::providers::Providers::served)):
/// real connections where the provider is simulated (its credentials missing, say), or sandbox
/// connections where the real provider runs. They are neither refreshed nor checked here.
async fn warn_of_connections_not_served(state: AppState) {
    let counted = async { crate::db::connections::active_by_kind(&mut *state.db.read().await?).await }.await;
    let kinds = match counted {
        Ok(kinds) => kinds,
        Err(e) => {
            tracing::warn!(error = %e, "the active connections could not be counted by provider");
            return;
        }
    };
    for (provider, sandbox, count) in kinds {
        let Ok(platform) = provider.parse::<crate::domain::Platform>() else { continue };
        if let Err(mode @ (crate::providers::Mode::Simulated | crate::providers::Mode::Real)) =
            state.providers.serving(platform, sandbox != 0)
        {
            tracing::warn!(
                provider = %platform, connections = count,
                "{count} active connection(s) left alone: {}. They are neither refreshed nor checked by this \
                 process{}",
                mode.explain(platform),
                if mode == crate::providers::Mode::Simulated {
                    "; configure the provider's credentials (a secret not mounted?) without sandbox = true, and restart"
                } else {
                    "; disconnect those no longer wanted"
                }
            );
        }
    }
}

/// Runs the job loop `start` makes until it ends (it ends when asked to stop); one that panics
/// (a bug) is logged and started again after `restart`, so that a process does not go on
/// running without that job.
async fn supervised<F, Fut>(name: &'static str, mut stop: watch::Receiver<bool>, restart: Duration, start: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(start()).await {
            Err(e) if e.is_panic() => {
                tracing::error!(
                    job = name,
                    "a background job stopped on an internal error; starting it again"
                );
                if !tick(&mut stop, restart).await {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Sleeps one tick, or returns false when asked to stop.
pub(crate) async fn tick(stop: &mut watch::Receiver<bool>, every: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(every) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// The refresh scheduler: claim due connections in batches and refresh them with bounded
/// concurrency.
async fn refresh_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.jobs.tick_ms);
    let limit = Arc::new(Semaphore::new(state.config.jobs.refresh_concurrency));
    let mut in_flight = JoinSet::new();
    loop {
        // Claim only while a refresh can start; a claim whose refresh waits so long for a
        // permit that too little of it is left is given back when its turn comes (see
        // `refresh_claimed`), and claimed again.
        let claimed = if limit.available_permits() > 0 {
            match refresh::claim_batch(&state).await {
                Ok(claims) => claims,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming due refreshes failed");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let full_batch = claimed.len() >= state.config.jobs.refresh_batch as usize;
        let mut claimed = claimed.into_iter();
        while let Some(claim) = claimed.next() {
            // No refresh starts once asked to stop: one cut off by the exit after the provider
            // rotated its token would lose the new one. What was claimed and not started is
            // given back at once, for another process.
            let permit = if *stop.borrow() {
                None
            } else {
                tokio::select! {
                    permit = limit.clone().acquire_owned() => permit.ok(),
                    _ = stop.changed() => None,
                }
            };
            let Some(permit) = permit else {
                for claim in std::iter::once(claim).chain(claimed.by_ref()) {
                    if let Err(e) = refresh::give_back(&state, &claim).await {
                        tracing::warn!(connection_id = %claim.id, error = %e, "giving back a refresh claim failed");
                    }
                }
                break;
            };
            let state = state.clone();
            in_flight.spawn(async move {
                let _permit = permit;
                if let Err(e) = refresh::refresh_claimed(&state, &claim.id).await {
                    tracing::warn!(connection_id = %claim.id, error = %e, "scheduled refresh failed");
                }
            });
        }
        while in_flight.try_join_next().is_some() {}
        // A full batch means more is due: go again at once.
        if full_batch {
            if *stop.borrow() {
                break;
            }
            continue;
        }
        if !tick(&mut stop, every).await {
            break;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Health checks, spread over the interval by their `next_check_at`.
async fn check_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.jobs.tick_ms.max(1000) * 5);
    loop {
        let due = async {
            let mut conn = state.db.read().await?;
            crate::db::connections::due_checks(&mut conn, state.now_ms(), 20, state.providers.served()).await
        }
        .await;
        match due {
            Ok(ids) => {
                for id in ids {
                    // Move the check first, only if it is still due: of several processes that
                    // found it due, the one that moves it runs it.
                    let taken = async {
                        let mut conn = state.db.writer().await?;
                        let now = state.now_ms();
                        let next = refresh::schedule_check(&state, now, false);
                        crate::db::connections::claim_check(&mut conn, &id, now, next).await
                    }
                    .await;
                    if !matches!(taken, Ok(true)) {
                        continue;
                    }
                    if let Err(e) = refresh::check(&state, &id).await {
                        tracing::warn!(connection_id = %id, error = %e, "health check failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "finding due health checks failed"),
        }
        if !tick(&mut stop, every).await {
            break;
        }
    }
}

/// `connection.expiring` announcements.
async fn expiring_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.jobs.tick_ms.max(1000) * 10);
    loop {
        if let Err(e) = refresh::announce_expiring(&state).await {
            tracing::warn!(error = %e, "announcing expiring connections failed");
        }
        if !tick(&mut stop, every).await {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::watch;

    /// A job loop that panics is started again; one that ends (asked to stop) is not.
    #[tokio::test]
    async fn a_panicking_job_is_started_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        let (_tx, rx) = watch::channel(false);
        let counted = Arc::clone(&runs);
        let job = move || {
            let counted = Arc::clone(&counted);
            async move {
                if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("a bug in a job loop");
                }
            }
        };
        tokio::time::timeout(
            Duration::from_secs(10),
            super::supervised("test", rx, Duration::from_millis(10), job),
        )
        .await
        .expect("the supervisor returns once the job ends");
        assert_eq!(runs.load(Ordering::SeqCst), 3, "two panics, then a run that ended");
    }
}
