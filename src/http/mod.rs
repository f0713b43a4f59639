//! The HTTP surface: one router for the public pages, the JSON API, the health probes and (in
//! sandbox mode) the provider simulator, wrapped in the layers every response needs.

/// The JSON API under `/api/v1`, with its OpenAPI document.
pub mod api;
/// The agency's dashboard under `/app`: server-rendered pages behind a sign-in, CSRF tokens on
/// every form.
pub mod dashboard;
/// Answers for requests whose handler panicked or ran past the request timeout.
mod failures;
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
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::state::AppState;

/// The path as it may be logged: link and invitation tokens are redacted, and
/// the query string (which carries OAuth codes and state) is never included.
pub fn loggable_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.starts_with("/app/invite/") {
        return "/app/invite/[redacted]".into();
    }
    match path.strip_prefix("/l/").map(|rest| rest.split_once('/')) {
        Some(Some((_, tail))) => format!("/l/[redacted]/{tail}").into(),
        Some(None) => "/l/[redacted]".into(),
        None => path.into(),
    }
}

/// Builds the whole application router.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();

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
        .fallback(pages::not_found)
        // After every route is in: the API's routes keep their own (a problem document).
        .method_not_allowed_fallback(pages::method_not_allowed);
    if config.providers.tiktok.is_sandbox() || config.providers.instagram.is_sandbox() {
        app = app.nest_service("/sandbox", state.sandbox.router());
    }
    with_layers(app.with_state(state), &config)
}

/// A path whose percent-encoding decodes to bytes that are not UTF-8 names nothing authlink
/// serves (no id, token or slug holds such bytes): the 404 of its part of the site, instead of the
/// plain-text 400 the router's extractors would answer.
async fn refuse_undecodable_paths(request: Request<Body>, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    if path.contains('%') && percent_encoding::percent_decode_str(path).decode_utf8().is_err() {
        return if path.starts_with("/api/") {
            api::ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such API route or object.")
                .into_response()
        } else if path.starts_with("/l/") {
            pages::link_not_found()
        } else {
            pages::not_found_page()
        };
    }
    next.run(request).await
}

/// Wraps `app` in the layers every response needs, innermost first: the body limit, the link
/// rate limit, the request timeout and panic guard, the security headers (outside the guard, so
/// that its 503s and 500s carry them too), the request log, and, when metrics are on, their
/// counting (outermost, so that every answer above is counted; only when on, so that it costs
/// nothing otherwise).
fn with_layers(app: Router, config: &Config) -> Router {
    let timeout = Duration::from_secs(config.http.request_timeout_secs);
    let security_headers = headers::SecurityHeaders::new(config);
    let link_limiter = ratelimit::LinkLimiter::new(config.http.link_requests_per_minute);
    // Validated with the configuration; an unparsable entry cannot reach here.
    let trusted_proxies =
        ratelimit::TrustedProxies(config.http.trusted_proxy_networks().unwrap_or_default().into());
    let app = app
        .layer(axum::middleware::from_fn(refuse_undecodable_paths))
        .layer(DefaultBodyLimit::max(config.http.body_limit_bytes))
        .layer(axum::middleware::from_fn_with_state(link_limiter, ratelimit::limit_links))
        .layer(axum::Extension(trusted_proxies))
        .layer(axum::middleware::from_fn_with_state(
            failures::Limits { timeout, https: config.is_https() },
            failures::contain,
        ))
        .layer(axum::middleware::from_fn_with_state(security_headers, headers::apply))
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
    if config.metrics.listen.is_some() {
        app.layer(axum::middleware::from_fn(crate::metrics::track_http))
    } else {
        app
    }
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
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    /// The configuration of the tests below: requests time out after a second.
    fn one_second_timeout() -> Config {
        let env = [("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS".to_string(), "1".to_string())];
        Config::load_from(None, &env).unwrap()
    }

    /// A handler with a bug.
    async fn boom() -> &'static str {
        panic!("a handler's bug")
    }

    /// A handler that runs past the timeout.
    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_secs(30)).await;
        "too late"
    }

    /// A panic and a request past the timeout, under the API and elsewhere, through the real
    /// layers: each gets a body in its caller's form, and the security headers.
    #[tokio::test]
    async fn a_panic_or_a_timeout_gets_a_body_and_the_security_headers() {
        let app = Router::new()
            .route("/api/v1/boom", get(boom))
            .route("/boom", get(boom))
            .route("/api/v1/slow", get(slow))
            .route("/slow", get(slow));
        let app = with_layers(app, &one_second_timeout());
        let cases = [
            ("/api/v1/boom", 500, "application/problem+json", "\"code\":\"internal\""),
            ("/boom", 500, "text/html; charset=utf-8", "Something went wrong"),
            ("/api/v1/slow", 503, "application/problem+json", "\"code\":\"request_timeout\""),
            ("/slow", 503, "text/html; charset=utf-8", "This took too long"),
        ];
        let answers = futures_util::future::join_all(
            cases
                .iter()
                .map(|(path, ..)| app.clone().oneshot(Request::get(*path).body(Body::empty()).unwrap())),
        )
        .await;
        for ((path, status, content_type, needle), res) in cases.into_iter().zip(answers) {
            let res = res.unwrap();
            assert_eq!(res.status().as_u16(), status, "{path}");
            let h = res.headers().clone();
            assert_eq!(h[header::CONTENT_TYPE], content_type, "{path}");
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(
                csp.contains("frame-ancestors 'none'") && csp.contains("object-src 'none'"),
                "{path}: {csp}"
            );
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY", "{path}");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer", "{path}");
            let body = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains(needle), "{path}: {body}");
        }
    }

    /// A callback cut short (past the timeout, or a panic) is redirected away from its address,
    /// which holds the code and the state, to the failure page, as every other way out of the
    /// callback; the page is told this browser's latest flow, from its cookie.
    #[tokio::test]
    async fn a_callback_cut_short_leaves_the_address_bar() {
        let app = Router::new()
            .route("/oauth/tiktok/callback", get(slow))
            .route("/oauth/instagram/callback", get(boom))
            .route("/oauth/nowhere/callback", get(slow));
        let app = with_layers(app, &one_second_timeout());
        let flow = "0193a4b2-0000-7000-8000-00000abc12ef";
        let cases = [
            (
                "/oauth/tiktok/callback?code=c0de&state=s7a7e",
                Some(format!("/oauth/tiktok/failed?reason=unavailable&flow={flow}")),
            ),
            (
                "/oauth/instagram/callback?code=c0de&state=s7a7e",
                Some("/oauth/instagram/failed?reason=internal".into()),
            ),
            ("/oauth/nowhere/callback?code=c0de", None),
        ];
        for (path, to) in cases {
            let req = Request::get(path)
                .header(header::COOKIE, format!("authlink_flow=abc; authlink_last_tiktok={flow}"))
                .body(Body::empty())
                .unwrap();
            let res = app.clone().oneshot(req).await.unwrap();
            match to {
                Some(to) => {
                    assert_eq!(res.status(), StatusCode::SEE_OTHER, "{path}");
                    assert_eq!(res.headers()[header::LOCATION], to.as_str(), "{path}");
                    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store", "{path}");
                }
                None => assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}"),
            }
        }
    }

    #[test]
    fn link_tokens_are_redacted() {
        assert_eq!(loggable_path("/l/abcdef"), "/l/[redacted]");
        assert_eq!(loggable_path("/l/abcdef/connect/tiktok"), "/l/[redacted]/connect/tiktok");
        assert_eq!(loggable_path("/app/invite/abcdef"), "/app/invite/[redacted]");
        assert_eq!(loggable_path("/api/v1/links"), "/api/v1/links");
    }
}
