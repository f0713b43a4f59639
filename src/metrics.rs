//! Prometheus metrics, for operators: served on a listener of their own (`metrics.listen`, off by
//! default), never on the public address.
//!
//! Counters and histograms are recorded where things happen, through the `metrics` facade; they
//! cost nothing while no recorder is installed (metrics off). Labels are bounded: route templates
//! (`/l/{token}`, never a path with a token in it), providers, statuses and outcome codes.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `authlink_http_requests_total` | `method`, `route`, `status` | requests answered |
//! | `authlink_http_request_duration_seconds` | `method`, `route` | histogram of request times |
//! | `authlink_connect_flows_started_total` | `provider` | flows started from a link |
//! | `authlink_connect_flows_refused_total` | `provider` | starts refused: the link had `http.link_open_attempts` attempts open |
//! | `authlink_connect_flows_total` | `provider`, `outcome` | callbacks: `connected`, `reconnected` or the failure code |
//! | `authlink_refreshes_total` | `provider`, `outcome` | refresh attempts: `refreshed`, `superseded`, `transient_failure`, `broken`, `error` |
//! | `authlink_webhook_deliveries_total` | `outcome` | delivery attempts: `succeeded`, `failed` (retried later), `gave_up` (no retry left, or 410) |
//! | `authlink_connections` | `provider`, `status` | connections now (read from the database at each scrape) |
//! | `authlink_sqlite_wal_restarts_total` | | SQLite: checkpoints that paused the writers so that a long WAL could start over |
//! | `authlink_build_info` | `version` | always 1 |

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::state::AppState;

/// Request-time histogram buckets, in seconds.
const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process's Prometheus recorder. Fails if one is installed already.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    metrics::gauge!("authlink_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Binds `addr` and serves `GET /metrics` there until `stop` turns true. Returns the bound
/// address (for a port of 0) once listening.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    state: AppState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route("/metrics", get(render)).with_state((handle, state));
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::warn!(error = %e, "metrics listener failed");
        }
    });
    tracing::info!(addr = %local, "metrics listening");
    Ok(local)
}

/// Held while a scrape reads the connection gauges: scrapes at once (a scraper's retries, or
/// anyone who can reach the address) take one database connection between them, not one each.
static READING_GAUGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `GET /metrics`: the counters, plus the connection gauges read now (or, while another scrape
/// reads them, as that one last read them).
async fn render(State((handle, state)): State<(PrometheusHandle, AppState)>) -> Response {
    if let Ok(_reading) = READING_GAUGES.try_lock() {
        read_gauges(&state).await;
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
}

/// Sets the connection gauges from the database (3 s at most).
async fn read_gauges(state: &AppState) {
    let counts = tokio::time::timeout(Duration::from_secs(3), async {
        let mut conn = state.db.read().await?;
        crate::db::dashboard::connection_totals(&mut conn).await
    })
    .await;
    match counts {
        Ok(Ok(rows)) => {
            for (provider, status, n) in rows {
                metrics::gauge!("authlink_connections", "provider" => provider, "status" => status)
                    .set(n as f64);
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics: connection counts unavailable"),
        Err(_) => tracing::warn!("metrics: connection counts timed out"),
    }
}

/// Middleware: counts every request and its time, by method, route template and status.
pub async fn track_http(req: Request, next: Next) -> Response {
    let started = Instant::now();
    // A fixed set: any token is a method to hyper, and a label per made-up one would grow the
    // series without bound.
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let res = next.run(req).await;
    let status = res.status();
    let elapsed = started.elapsed().as_secs_f64();
    metrics::histogram!("authlink_http_request_duration_seconds", "method" => method.clone(), "route" => route.clone())
        .record(elapsed);
    metrics::counter!("authlink_http_requests_total", "method" => method, "route" => route, "status" => status.as_u16().to_string())
        .increment(1);
    res
}
