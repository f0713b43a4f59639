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

/// What [`contain`] needs to know.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `http.request_timeout_secs`.
    pub timeout: Duration,
    /// Whether the public URL is https (it names the cookies a callback's answer reads).
    pub https: bool,
}

/// Middleware: runs the rest of the stack within `timeout`, catching a panic, and answers a
/// failure in the caller's form: for an OAuth callback, the redirect every other failure of it
/// gets, away from the address that holds the code.
pub async fn contain(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let api = is_api(req.uri().path());
    // A callback's path and cookies (all its answer reads), kept in case the handler never
    // answers; nothing for any other request.
    let path = req.uri().path();
    let callback = (path.starts_with("/oauth/") && path.ends_with("/callback")).then(|| {
        let mut cookies = axum::http::HeaderMap::new();
        for v in req.headers().get_all(axum::http::header::COOKIE) {
            cookies.append(axum::http::header::COOKIE, v.clone());
        }
        (path.to_string(), cookies)
    });
    let link_page = pages::link_page_of(path);
    let timeout = limits.timeout;
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
    if let Some((path, headers)) = callback
        && let Some(res) =
            pages::connect::callback_cut_short(limits.https, &path, &headers, failure == Failure::Panic)
    {
        return res;
    }
    answer(api, failure, link_page)
}

/// Whether the caller of `path` reads problem documents (the JSON API) rather than pages.
fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// The answer of a request that failed; a link's page (`link_page`) is where the page's "Try
/// again" leads.
fn answer(api: bool, failure: Failure, link_page: Option<String>) -> Response {
    match (api, failure) {
        (true, Failure::Panic) => api::internal_error(),
        (true, Failure::Timeout) => api::timed_out(),
        (false, Failure::Panic) => pages::internal_error(link_page),
        (false, Failure::Timeout) => pages::timed_out(link_page),
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
                let res = answer(api, failure, None);
                assert_eq!(res.status().as_u16(), status, "{failure:?}");
                assert_eq!(res.headers()["content-type"], content_type, "{failure:?}");
            }
        }
    }

    /// A link's page or form that failed leads back to the link's page (reloading a form's
    /// answer would post it again).
    #[tokio::test]
    async fn a_failure_of_a_link_page_leads_back_to_it() {
        assert_eq!(pages::link_page_of("/l/abc/connect/tiktok").as_deref(), Some("/l/abc"));
        assert_eq!(pages::link_page_of("/l/abc").as_deref(), Some("/l/abc"));
        assert_eq!(pages::link_page_of("/l/"), None);
        assert_eq!(pages::link_page_of("/app/w/x"), None);
        for failure in [Failure::Panic, Failure::Timeout] {
            let res = answer(false, failure, pages::link_page_of("/l/abc/connect/tiktok"));
            let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
            assert!(String::from_utf8_lossy(&body).contains("href=\"/l/abc\">Try again"), "{failure:?}");
        }
    }
}
