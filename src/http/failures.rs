//! Answers for requests whose handler never answers: it panicked, or it ran past
//! `http.request_timeout_secs`. Such a request still gets a body in the form its caller reads:
//! an RFC 9457 problem document under `/api/`, a plain message page anywhere else.
//!
//! One middleware does both (rather than tower-http's timeout and panic layers) because only it
//! sees the request's path, which decides the form of the answer.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::FutureExt;

use super::{api, pages};

/// What went wrong with a request its handler did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The handler panicked: 500.
    Panic,
    /// The handler ran past the request timeout: 503.
    Timeout,
}

/// Middleware: runs the rest of the stack within `timeout`, catching a panic, and answers a
/// failure in the caller's form.
pub async fn contain(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    let api = is_api(req.uri().path());
    let run = AssertUnwindSafe(next.run(req)).catch_unwind();
    let failure = match tokio::time::timeout(timeout, run).await {
        Ok(Ok(res)) => return res,
        Ok(Err(_panic)) => {
            tracing::error!("a request handler panicked");
            Failure::Panic
        }
        Err(_) => {
            tracing::warn!(timeout_secs = timeout.as_secs(), "a request did not finish in time");
            Failure::Timeout
        }
    };
    answer(api, failure)
}

/// Whether the caller of `path` reads problem documents (the JSON API) rather than pages.
fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

fn answer(api: bool, failure: Failure) -> Response {
    match (api, failure) {
        (true, Failure::Panic) => api::internal_error(),
        (true, Failure::Timeout) => api::timed_out(),
        (false, Failure::Panic) => pages::internal_error(),
        (false, Failure::Timeout) => pages::timed_out(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_get_problem_documents_and_others_pages() {
        assert!(is_api("/api/v1/links") && is_api("/api/") && is_api("/api"));
        assert!(!is_api("/apis") && !is_api("/app/w/x") && !is_api("/l/abc") && !is_api("/"));
        for (api, content_type) in [(true, "application/problem+json"), (false, "text/html; charset=utf-8")] {
            for (failure, status) in [(Failure::Panic, 500), (Failure::Timeout, 503)] {
                let res = answer(api, failure);
                assert_eq!(res.status().as_u16(), status, "{failure:?}");
                assert_eq!(res.headers()["content-type"], content_type, "{failure:?}");
            }
        }
    }
}
