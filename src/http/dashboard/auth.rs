//! Sign-in, sign-out and password change.
//!
//! The sign-in form's CSRF token is derived from a pre-sign-in cookie (so that another site
//! cannot sign a browser in to an account of its choosing); a successful sign-in replaces any
//! session the browser had with a new one. A wrong password, an unknown email and a disabled
//! account all get the same answer.

use askama::Template;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;

use super::{
    Ctx, DashResult, FormData, FormErrors, Layout, client_ip, cookie, csrf_for, device_cookie_name, layout,
    login_cookie_name, read_cookie, render, secret, see_other, session_cookie_name,
};
use crate::crypto;
use crate::service::users::{self, PasswordChange, SESSION_ABSOLUTE_MS, SignIn};
use crate::state::AppState;

/// The client's address, as [`client_ip`] finds it.
pub struct ClientIp(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(parts)))
    }
}

/// Percent-decodes `s` (invalid escapes stay as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `next` return path, if it is safe: a path of the dashboard on this origin, written
/// plainly. Absolute URLs, scheme-relative `//host`, backslashes (`/\host`, which browsers read as
/// `//host`), control characters, dot segments leaving `/app`, and encoded variants of these
/// (decoded up to three times) are refused.
pub fn safe_next(raw: &str) -> Option<String> {
    if raw.is_empty() || raw.len() > 2000 {
        return None;
    }
    let mut candidate = raw.to_string();
    for _ in 0..4 {
        if candidate.contains('\\')
            || candidate.contains("//")
            || candidate.contains("..")
            || candidate.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return None;
        }
        let decoded = percent_decode(&candidate);
        if decoded == candidate {
            break;
        }
        candidate = decoded;
    }
    if !(raw == "/app" || raw.starts_with("/app/") || raw.starts_with("/app?")) {
        return None;
    }
    let base = url::Url::parse("http://authlink.invalid/").ok()?;
    let resolved = base.join(raw).ok()?;
    let path_ok = resolved.path() == "/app" || resolved.path().starts_with("/app/");
    if resolved.host_str() != Some("authlink.invalid") || !path_ok || resolved.username() != "" {
        return None;
    }
    Some(raw.to_string())
}

#[derive(Template)]
#[template(path = "dashboard/login.html")]
struct LoginPage {
    l: Layout,
    email: String,
    next: String,
    error: Option<&'static str>,
}

/// The query of the sign-in page. (Its `Debug` hides `next`, which may be an invitation's
/// capability URL.)
#[derive(Default, Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    notice: Option<String>,
}
redacted_debug!(LoginQuery, shown: [notice], hidden: [next]);

/// The pre-sign-in token: the browser's, or a new one.
fn login_token(state: &AppState, headers: &HeaderMap) -> String {
    match read_cookie(headers, login_cookie_name(state)) {
        Some(t) => t.to_string(),
        None => crypto::random_token(),
    }
}

fn login_page(
    state: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    email: &str,
    next: &str,
    error: Option<&'static str>,
    notice: Option<&str>,
) -> Response {
    let token = login_token(state, headers);
    let page = LoginPage {
        l: Layout::bare(csrf_for(&token), notice.and_then(super::notice_text)),
        email: email.chars().take(254).collect(),
        next: safe_next(next).unwrap_or_default(),
        error,
    };
    let mut res = render(status, &page);
    // Set again with each page (its hour starts over), so that a form just shown does not expire
    // before it is sent.
    res.headers_mut().append(header::SET_COOKIE, cookie(state, login_cookie_name(state), Some(&token), 3600));
    res
}

/// `GET /app/login`: the sign-in form (or, when already signed in, the page asked for).
pub async fn login_form(
    State(state): State<AppState>,
    Query(q): Query<LoginQuery>,
    headers: HeaderMap,
) -> DashResult {
    if let Some(token) = read_cookie(&headers, session_cookie_name(&state))
        && users::authenticate(&state, token).await?.is_some()
    {
        let to = q.next.as_deref().and_then(safe_next).unwrap_or_else(|| "/app".into());
        return Ok(see_other(&to));
    }
    let next = q.next.unwrap_or_default();
    Ok(login_page(&state, &headers, StatusCode::OK, "", &next, None, q.notice.as_deref()))
}

/// `POST /app/login`.
pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: FormData,
) -> DashResult {
    let email = form.get("email");
    let next = form.get("next");
    let password = secret(&form, "password");
    let previous = read_cookie(&headers, session_cookie_name(&state));
    let device = read_cookie(&headers, device_cookie_name(&state));
    match users::sign_in(&state, email, &password, &ip, previous, device).await? {
        SignIn::Success(s) => {
            let to = safe_next(next).unwrap_or_else(|| "/app".into());
            Ok(signed_in_to(&state, &to, &s))
        }
        SignIn::Invalid => Ok(login_page(
            &state,
            &headers,
            StatusCode::UNAUTHORIZED,
            email,
            next,
            Some("The email or password is incorrect."),
            None,
        )),
        SignIn::Throttled => Ok(login_page(
            &state,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            email,
            next,
            Some("Too many sign-in attempts. Wait 15 minutes, then try again."),
            None,
        )),
    }
}

/// A 303 to `to` for a browser whose new session is `new`: its cookie set, the pre-sign-in
/// cookie cleared.
pub(super) fn signed_in_to(state: &AppState, to: &str, new: &users::NewSession) -> Response {
    use secrecy::ExposeSecret;
    let mut res = see_other(to);
    let h = res.headers_mut();
    h.append(
        header::SET_COOKIE,
        cookie(
            state,
            session_cookie_name(state),
            Some(new.token.expose_secret()),
            SESSION_ABSOLUTE_MS / 1000,
        ),
    );
    h.append(header::SET_COOKIE, cookie(state, login_cookie_name(state), None, 0));
    if let Some(device) = &new.device {
        let max_age = users::DEVICE_TRUST_MS / 1000;
        h.append(
            header::SET_COOKIE,
            cookie(state, device_cookie_name(state), Some(device.expose_secret()), max_age),
        );
    }
    res
}

/// `POST /app/logout`: ends the session and clears the cookie.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> DashResult {
    if let Some(token) = read_cookie(&headers, session_cookie_name(&state)) {
        users::sign_out(&state, token).await?;
    }
    let mut res = see_other("/app/login?notice=signed_out");
    res.headers_mut().append(header::SET_COOKIE, cookie(&state, session_cookie_name(&state), None, 0));
    Ok(res)
}

#[derive(Template)]
#[template(path = "dashboard/account.html")]
struct AccountPage {
    l: Layout,
    email: String,
    memberships: Vec<users::MembershipView>,
    errors: FormErrors,
    signed_in_at: String,
    expires_at: String,
}

async fn account_page(
    state: &AppState,
    ctx: &Ctx,
    status: StatusCode,
    errors: FormErrors,
    notice: Option<&str>,
) -> DashResult {
    let user = users::view_of(state, &ctx.user).await?;
    let memberships = user.workspaces;
    let page = AccountPage {
        l: layout(state, ctx, None, "account", notice).await?,
        email: user.email,
        memberships,
        errors,
        signed_in_at: super::fmt_ms(ctx.session.created_at),
        expires_at: super::fmt_ms(ctx.session.expires_at),
    };
    Ok(render(status, &page))
}

/// `GET /app/account`: the user's account and the password form.
pub async fn account(State(state): State<AppState>, ctx: Ctx, Query(q): Query<LoginQuery>) -> DashResult {
    account_page(&state, &ctx, StatusCode::OK, FormErrors::default(), q.notice.as_deref()).await
}

/// `POST /app/account/password`.
pub async fn change_password(State(state): State<AppState>, ctx: Ctx, form: FormData) -> DashResult {
    let input = PasswordChange {
        current: secret(&form, "current_password"),
        new: secret(&form, "new_password"),
        confirm: secret(&form, "confirm_password"),
    };
    match users::change_password(&state, &ctx.user, &ctx.session.id, &ctx.ip, &input).await {
        // A new session for this browser (every session of the user ended with the change).
        Ok(new) => Ok(signed_in_to(&state, "/app/account?notice=password_changed", &new)),
        Err(e) => {
            let errors = FormErrors::from_service(e)?;
            account_page(&state, &ctx, StatusCode::UNPROCESSABLE_ENTITY, errors, None).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    /// The sign-in page's query prints without its `next`, which may be an invitation's URL.
    #[test]
    fn the_sign_in_query_prints_without_its_next() {
        let uri: axum::http::Uri = "/app/login?next=/app/invite/CANARY-77&notice=signed_out".parse().unwrap();
        let axum::extract::Query(q) = axum::extract::Query::<super::LoginQuery>::try_from_uri(&uri).unwrap();
        let printed = format!("{q:?}");
        assert!(printed.contains("signed_out") && printed.contains("[redacted]"), "{printed}");
        assert!(!printed.contains("CANARY"), "{printed}");
    }

    #[test]
    fn next_stays_on_the_dashboard() {
        for ok in ["/app", "/app/w/acme", "/app/w/acme/links?q=x&before=1", "/app?x=1"] {
            assert_eq!(safe_next(ok).as_deref(), Some(ok), "{ok}");
        }
        for bad in [
            "",
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "https://evil.example/app",
            "http:/evil.example",
            "javascript:alert(1)",
            "/%2f%2fevil.example",
            "/%5cevil.example",
            "/app/%2F%2Fevil.example",
            "/app/%252f%252fevil.example",
            "/app/../evil",
            "/app/%2e%2e/evil",
            "/app/..%2fevil",
            "/app\t/x",
            "/app/\nx",
            "/apple",
            "/evil",
            "app",
        ] {
            assert_eq!(safe_next(bad), None, "{bad}");
        }
    }

    /// No payload of the open-redirect corpus, nor any of them after a path of ours, leads a
    /// browser off the dashboard: an accepted `next` resolves, against our origin, to our origin
    /// and under `/app`, and still does once more percent-decoded.
    #[test]
    fn no_corpus_payload_leaves_the_dashboard() {
        let base = url::Url::parse("https://links.example/").unwrap();
        let mut payloads = crate::domain::open_redirect_corpus("links.example");
        for p in crate::domain::open_redirect_corpus("links.example") {
            payloads.push(format!("/app/{p}"));
            payloads.push(format!("/app{p}"));
        }
        assert!(payloads.len() >= 500);
        let mut accepted = 0;
        for p in &payloads {
            let Some(next) = safe_next(p) else { continue };
            accepted += 1;
            for form in [next.clone(), super::percent_decode(&next)] {
                let to = base.join(&form).unwrap();
                assert_eq!(to.origin(), base.origin(), "{p} -> {to}");
                assert!(to.path() == "/app" || to.path().starts_with("/app/"), "{p} -> {to}");
            }
        }
        assert!(accepted > 0, "the corpus holds dashboard paths too");
    }

    proptest::proptest! {
        /// Random strings built from the characters redirects are made of.
        #[test]
        fn random_next_values_stay_on_the_dashboard(raw in "(/|app|\\\\|%2f|%5c|%25|%2e|\\.|:|@|evil|\\?|#|\\t| ){0,12}") {
            if let Some(next) = safe_next(&raw) {
                let to = url::Url::parse("https://links.example/").unwrap().join(&next).unwrap();
                proptest::prop_assert_eq!(to.host_str(), Some("links.example"));
                proptest::prop_assert!(to.path() == "/app" || to.path().starts_with("/app/"), "{}", to);
            }
        }
    }
}
