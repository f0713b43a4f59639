//! Security headers on every response.
//!
//! The Content-Security-Policy allows nothing but our own stylesheet and scripts: no inline code,
//! no third-party origins. `form-action` also lists the providers' authorization origins, because
//! browsers apply it to the redirect that follows a form submission (the connect buttons POST to
//! us and we answer 303 to the provider).

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::config::Config;

/// The precomputed header values.
#[derive(Clone, Debug)]
pub struct SecurityHeaders {
    csp: HeaderValue,
    hsts: Option<HeaderValue>,
}

impl SecurityHeaders {
    /// Computes the headers for this configuration.
    pub fn new(config: &Config) -> Self {
        let mut form_action = vec!["'self'".to_string()];
        for url in [&config.providers.tiktok.authorize_url, &config.providers.instagram.authorize_url] {
            let origin = url.origin().ascii_serialization();
            if !form_action.contains(&origin) {
                form_action.push(origin);
            }
        }
        let csp = format!(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
             form-action {}; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
            form_action.join(" ")
        );
        #[allow(clippy::expect_used)] // built from origins, which are ASCII
        let csp = HeaderValue::from_str(&csp).expect("CSP header value");
        let hsts = config.is_https().then(|| HeaderValue::from_static("max-age=31536000; includeSubDomains"));
        Self { csp, hsts }
    }
}

/// Middleware: adds the headers unless a handler set its own.
pub async fn apply(State(h): State<SecurityHeaders>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let headers = res.headers_mut();
    headers.entry(header::CONTENT_SECURITY_POLICY).or_insert_with(|| h.csp.clone());
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.entry(header::REFERRER_POLICY).or_insert(HeaderValue::from_static("no-referrer"));
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    if let Some(hsts) = &h.hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    res
}
