//! The HTTP surface: one router for the public pages, the JSON API, the health probes and (in
//! sandbox mode) the provider simulator, wrapped in the layers every response needs.

/// The JSON API under `/api/v1`, with its OpenAPI document.
pub mod api;
pub mod dashboard;
/// Security headers (CSP, HSTS, nosniff, framing, referrer policy).
mod headers;
/// The client-facing HTML pages: link landing page, connect flow, errors.
pub mod pages;
/// The per-client rate limit of the link URL space.
pub mod ratelimit;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::state::AppState;

/// The path as it may be logged: link tokens and anything that looks like one are redacted, and
/// the query string (which carries OAuth codes and state) is never included.
pub fn loggable_path(path: &str) -> std::borrow::Cow<'_, str> {
    match path.strip_prefix("/l/").map(|rest| rest.split_once('/')) {
        Some(Some((_, tail))) => format!("/l/[redacted]/{tail}").into(),
        Some(None) => "/l/[redacted]".into(),
        None => path.into(),
    }
}

/// Builds the whole application router.
pub fn router(state: AppState) -> Router {
    let config = &state.config;
    let timeout = Duration::from_secs(config.http.request_timeout_secs);
    let body_limit = config.http.body_limit_bytes;
    let security_headers = headers::SecurityHeaders::new(config);
    let link_limiter = ratelimit::LinkLimiter::new(config.http.link_requests_per_minute);
    // Validated with the configuration; an unparsable entry cannot reach here.
    let trusted_proxies =
        ratelimit::TrustedProxies(config.http.trusted_proxy_networks().unwrap_or_default().into());

    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/static/authlink.css", get(stylesheet))
        .route("/robots.txt", get(robots))
        .merge(pages::router())
        .merge(dashboard::router(state.clone()))
        .nest(
            "/api/v1",
            api::router(state.clone()).layer(axum::Extension(ratelimit::ApiLimits::new(&config.http))),
        )
        .fallback(pages::not_found);
    if config.providers.tiktok.is_sandbox() || config.providers.instagram.is_sandbox() {
        app = app.nest_service("/sandbox", state.sandbox.router());
    }
    let metrics_on = config.metrics.listen.is_some();
    let app = app
        .with_state(state)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(link_limiter, ratelimit::limit_links))
        .layer(axum::Extension(trusted_proxies))
        .layer(axum::middleware::from_fn_with_state(security_headers, headers::apply))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, timeout))
        .layer(CatchPanicLayer::custom(|_panic: Box<dyn std::any::Any + Send>| {
            tracing::error!("a request handler panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<Body>| {
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %loggable_path(req.uri().path()),
                    )
                })
                .on_request(())
                .on_response(|res: &Response, latency: Duration, _span: &tracing::Span| {
                    // Successful requests at debug (an access log line costs more than a link
                    // page itself); failures always at info.
                    let status = res.status().as_u16();
                    let latency_ms = latency.as_secs_f64() * 1000.0;
                    if status >= 400 {
                        tracing::info!(status, latency_ms, "request finished");
                    } else {
                        tracing::debug!(status, latency_ms, "request finished");
                    }
                }),
        );
    // Outermost, so that refusals of the layers above (429, 503, a panic's 500) are counted; only
    // when metrics are on, so that it costs nothing otherwise.
    if metrics_on { app.layer(axum::middleware::from_fn(crate::metrics::track_http)) } else { app }
}

/// `GET /healthz`: the process is up.
async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: the database answers.
async fn readyz(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(3), state.db.ping()).await {
        Ok(Ok(())) => "ready".into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
        Err(_) => {
            tracing::warn!("readiness check timed out");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("../../static/authlink.css"),
    )
        .into_response()
}

/// Capability URLs must not be indexed; everything else may be.
async fn robots() -> &'static str {
    "User-agent: *\nDisallow: /l/\nDisallow: /oauth/\nDisallow: /sandbox/\n"
}

#[cfg(test)]
mod tests {
    use super::loggable_path;

    #[test]
    fn link_tokens_are_redacted() {
        assert_eq!(loggable_path("/l/abcdef"), "/l/[redacted]");
        assert_eq!(loggable_path("/l/abcdef/connect/tiktok"), "/l/[redacted]/connect/tiktok");
        assert_eq!(loggable_path("/api/v1/links"), "/api/v1/links");
    }
}
