//! The sandbox's HTML: the consent page, the authorize error page and the fake avatars.
//!
//! The pages load nothing external and need no JavaScript; their CSP allows only the inline
//! stylesheet and same-origin images.

use askama::Template;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One hidden form field.
#[derive(Debug, Clone)]
pub(super) struct Hidden {
    pub(super) name: String,
    pub(super) value: String,
}

/// One fake account offered on the consent page.
#[derive(Debug, Clone)]
pub(super) struct AccountChoice {
    /// The `account` field value (open_id / user_id).
    pub(super) value: String,
    /// `@handle`.
    pub(super) handle: String,
    pub(super) name: String,
    /// A short note (account type, ...).
    pub(super) note: String,
    /// The avatar, a same-origin URL.
    pub(super) avatar: String,
}

/// One requested scope on the consent page.
#[derive(Debug, Clone)]
pub(super) struct ScopeChoice {
    pub(super) name: String,
    pub(super) description: String,
    /// Required scopes are shown checked and disabled, and sent as a hidden field.
    pub(super) required: bool,
}

/// The authorize request's parameters named in `names` that it carries, as hidden fields of
/// the consent form.
pub(super) fn hidden_fields(p: &super::Params, names: &[&str]) -> Vec<Hidden> {
    names
        .iter()
        .filter_map(|n| p.get(n).map(|v| Hidden { name: (*n).to_string(), value: v.to_string() }))
        .collect()
}

/// The requested scopes as the consent page lists them, described from `known` (scope,
/// description), with `required` checked and disabled.
pub(super) fn scope_choices(
    requested: &[String],
    known: &[(&str, &str)],
    required: &str,
) -> Vec<ScopeChoice> {
    requested
        .iter()
        .map(|s| ScopeChoice {
            name: s.clone(),
            description: known
                .iter()
                .find(|(k, _)| k == s)
                .map_or_else(|| s.clone(), |(_, d)| (*d).to_string()),
            required: s == required,
        })
        .collect()
}

/// The consent page of either provider.
#[derive(Template)]
#[template(path = "sandbox/consent.html")]
pub(super) struct ConsentPage {
    /// "TikTok" or "Instagram".
    pub(super) provider: &'static str,
    /// `tiktok` or `instagram` (a CSS class).
    pub(super) slug: &'static str,
    /// The name of the client parameter (`client_key` / `client_id`).
    pub(super) client_param: &'static str,
    pub(super) client_id: String,
    pub(super) redirect_uri: String,
    /// Where the form posts.
    pub(super) action: String,
    pub(super) hidden: Vec<Hidden>,
    pub(super) accounts: Vec<AccountChoice>,
    pub(super) scopes: Vec<ScopeChoice>,
    /// Whether the `deny_all` switch is on (shown as a notice).
    pub(super) deny_all: bool,
}

/// The page shown for an authorize request that is refused without a redirect.
#[derive(Template)]
#[template(path = "sandbox/error.html")]
pub(super) struct ErrorPage {
    pub(super) provider: &'static str,
    pub(super) slug: &'static str,
    /// The offending parameter.
    pub(super) param: String,
    pub(super) message: String,
}

/// Renders a page with the sandbox's headers.
pub(super) fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(body) => {
            let mut resp = (status, body).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; \
                     frame-ancestors 'none'; object-src 'none'",
                ),
            );
            h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "sandbox page failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the sandbox page failed to render").into_response()
        }
    }
}

/// An error page naming `param`.
pub(super) fn error_page(provider: &'static str, slug: &'static str, param: &str, message: &str) -> Response {
    render(
        StatusCode::BAD_REQUEST,
        &ErrorPage { provider, slug, param: param.to_string(), message: message.to_string() },
    )
}

/// `GET /sandbox/avatars/{name}.svg`: a generated avatar (initials on a colour from the name).
pub(super) async fn avatar(Path(name): Path<String>) -> Response {
    let Some(stem) = name.strip_suffix(".svg") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if stem.is_empty() || stem.len() > 40 || !stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return StatusCode::NOT_FOUND.into_response();
    }
    let initial = stem.chars().next().map(|c| c.to_ascii_uppercase()).unwrap_or('?');
    let hue = stem.bytes().fold(0u32, |acc, b| acc.wrapping_mul(31).wrapping_add(u32::from(b))) % 360;
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100\" height=\"100\" viewBox=\"0 0 100 100\">\
         <rect width=\"100\" height=\"100\" fill=\"hsl({hue},55%,45%)\"/>\
         <text x=\"50\" y=\"64\" font-family=\"sans-serif\" font-size=\"44\" text-anchor=\"middle\" \
         fill=\"#fff\">{initial}</text></svg>"
    );
    let mut resp = svg.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; \
             object-src 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400"));
    resp
}
