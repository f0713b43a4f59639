//! The dashboard's stylesheet and script (compiled into the binary, served same-origin), the
//! tiny colour stylesheets of the branding preview (the CSP forbids inline styles, so a colour
//! that is not saved yet arrives as a stylesheet of its own), and an empty favicon.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `GET /app/static/dashboard.css`.
pub async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=300")],
        include_str!("../../../static/dashboard.css"),
    )
        .into_response()
}

/// `GET /app/static/dashboard.js`.
pub async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../../../static/dashboard.js"),
    )
        .into_response()
}

/// `GET /app/preview/{rrggbb}.css`: the accent colour of the branding preview, with readable
/// text on it. Only six hex digits are accepted, so nothing else can reach the stylesheet.
pub async fn preview_colours(Path(file): Path<String>) -> Response {
    let Some(hex) =
        file.strip_suffix(".css").filter(|h| h.len() == 6 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let colour = format!("#{}", hex.to_ascii_lowercase());
    let css = format!(
        ".preview {{ --accent: {colour}; --accent-text: {}; }}\n",
        crate::http::pages::contrast_text(&colour)
    );
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=86400")],
        css,
    )
        .into_response()
}

/// `GET /favicon.ico`: browsers ask for it on every page; "no content" instead of a 404, which
/// they would report as an error in the console.
pub async fn favicon() -> Response {
    (StatusCode::NO_CONTENT, [(header::CACHE_CONTROL, "public, max-age=86400")]).into_response()
}
