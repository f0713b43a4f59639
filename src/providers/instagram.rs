//! Instagram API with Instagram Login (Business Login for Instagram), per providers.md §3.
//!
//! The flow: authorize (no PKCE: Instagram has none) → `POST oauth/access_token` for a short-lived
//! token (1 h) → `GET graph/access_token?grant_type=ig_exchange_token` for a long-lived one (60 d)
//! → `/me` for the profile. There is no refresh token: the long-lived access token itself is
//! refreshed (`ig_refresh_token`), and a new 60-day token comes back.
//!
//! Tolerances (§9.5): the token answer may be flat or wrapped in `{data:[...]}`, `user_id` may be
//! a string or a JSON number above 2^53 (read as u64, never as f64), `permissions` may be a comma
//! string or an array, `/me` may be wrapped in `data:[...]`, and a trailing `#_` on the code is
//! stripped.
//!
//! Classification (§9.3):
//! - the code-exchange error `{error_type, code, error_message}` with "Matching code was not found
//!   or was already used" is **Permanent**: the code is spent, so the person has to authorize
//!   again (the same class as TikTok's `invalid_grant`). A bad client secret, an unknown app and a
//!   redirect_uri mismatch are Misconfigured (the operator's settings), other exchange errors
//!   Rejected, and 429/5xx are Transient;
//! - Graph errors `{error:{message,type,code,error_subcode,is_transient}}`: 190 is Permanent, with
//!   a reason chosen by subcode; 10 and 200–299 are Scope; 4/17/32/613, a plain 429, 1/2 and
//!   `is_transient` are Transient; a refused client secret (the message "Error validating client
//!   secret.", whatever its code: the sandbox sends 101, which providers.md does not name) and
//!   101 are Misconfigured; other codes are Rejected (Transient on a 5xx).
//!
//! The client secret and tokens travel in query strings here: no URL is ever logged, and every
//! provider text is passed through `sanitize` before it reaches a reason.

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use url::Url;

use super::tiktok::{
    RawResponse, as_i64, expiry, id_string, public_url, sanitize, scope_list, send, status_error, str_field,
};
use super::{AuthorizeRequest, Profile, ProviderError, TokenSet};
use crate::config::Config;

/// How the reason of a refused personal account starts (the connect flow tells the client
/// what to change on that alone; a provider's own error text never starts with it).
pub const PERSONAL_ACCOUNT: &str = "personal accounts cannot be connected";

/// Whether a profile call's refusal says Instagram names the account personal (not merely a
/// type this build does not know, which may be one Instagram added).
pub fn names_personal_account(reason: &str) -> bool {
    reason.starts_with(PERSONAL_ACCOUNT) && reason.to_ascii_lowercase().contains("as personal;")
}

/// The profile fields asked for: those of §3.6, the counts included (not stored).
const PROFILE_FIELDS: &str =
    "user_id,username,name,account_type,profile_picture_url,followers_count,follows_count,media_count";
/// The account types that Instagram Login serves.
const PROFESSIONAL_TYPES: [&str; 2] = ["BUSINESS", "MEDIA_CREATOR"];
/// The youngest a long-lived token may be to be refreshed (§3.5).
pub const MIN_REFRESH_AGE: time::Duration = time::Duration::hours(24);

/// The Instagram adapter.
#[derive(Debug, Clone)]
pub struct Instagram {
    /// Whether this adapter points at the built-in sandbox.
    pub sandbox: bool,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    client_id: String,
    client_secret: SecretString,
    authorize_url: Url,
    token_url: Url,
    /// Graph host, without a trailing slash (`https://graph.instagram.com`).
    graph_base: String,
    graph_api_version: String,
    http: reqwest::Client,
}

/// The short-lived token answer, before the long-lived exchange.
#[derive(Debug)]
pub(super) struct ShortLived {
    pub(super) access_token: SecretString,
    user_id: Option<String>,
    permissions: Vec<String>,
}

impl Instagram {
    /// Builds the adapter from the configuration: the configured endpoints and credentials, or the
    /// built-in sandbox (`{public_url}/sandbox/instagram/...` with its fixed test credentials) when
    /// the provider runs in sandbox mode.
    pub fn from_config(config: &Config, http: reqwest::Client) -> Self {
        let c = &config.providers.instagram;
        let graph_api_version = c.graph_api_version.trim_matches('/').to_string();
        if c.is_sandbox() {
            Self {
                sandbox: true,
                scopes: c.scopes.clone(),
                client_id: crate::sandbox::INSTAGRAM_CLIENT_ID.to_string(),
                client_secret: SecretString::from(crate::sandbox::INSTAGRAM_CLIENT_SECRET),
                authorize_url: public_url(config, "/sandbox/instagram/oauth/authorize"),
                token_url: public_url(config, "/sandbox/instagram/oauth/access_token"),
                graph_base: config.public("/sandbox/instagram/graph"),
                graph_api_version,
                http,
            }
        } else {
            Self {
                sandbox: false,
                scopes: c.scopes.clone(),
                client_id: c.client_id.clone().unwrap_or_default(),
                client_secret: c.client_secret.clone().unwrap_or_else(|| SecretString::from("")),
                authorize_url: c.authorize_url.clone(),
                token_url: c.token_url.clone(),
                graph_base: c.graph_base_url.as_str().trim_end_matches('/').to_string(),
                graph_api_version,
                http,
            }
        }
    }

    /// The authorization URL (§3.1): `client_id`, `redirect_uri`, `response_type=code`,
    /// comma-joined `scope` and `state`. No PKCE: Instagram does not support it.
    pub fn authorize_url(&self, req: &AuthorizeRequest<'_>) -> Url {
        let mut url = self.authorize_url.clone();
        url.query_pairs_mut()
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", req.redirect_uri)
            .append_pair("response_type", "code")
            .append_pair("scope", &self.scopes.join(","))
            .append_pair("state", req.state);
        url
    }

    /// Exchanges a code for a short-lived token (§3.3), then that for a long-lived one (§3.4).
    /// The result has no refresh token; `scopes` are the granted `permissions` and `account_id`
    /// the exchange's `user_id`.
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        now: OffsetDateTime,
    ) -> Result<TokenSet, ProviderError> {
        let code = strip_fragment(code);
        let secret = self.client_secret.expose_secret();
        let form = [
            ("client_id", self.client_id.as_str()),
            ("client_secret", secret),
            ("grant_type", "authorization_code"),
            ("redirect_uri", redirect_uri),
            ("code", code),
        ];
        let what = "Instagram code exchange";
        let raw = send(self.http.post(self.token_url.clone()).form(&form), what).await?;
        let short = parse_short_lived(&raw, what, &[secret, code])?;

        let what = "Instagram long-lived token exchange";
        let req = self.http.get(format!("{}/access_token", self.graph_base)).query(&[
            ("grant_type", "ig_exchange_token"),
            ("client_secret", secret),
            ("access_token", short.access_token.expose_secret()),
        ]);
        let raw = send(req, what).await?;
        let (access_token, access_expires_at) =
            parse_long_lived(&raw, now, what, &[secret, short.access_token.expose_secret()])?;
        Ok(TokenSet {
            access_token,
            access_expires_at,
            refresh_token: None,
            refresh_expires_at: None,
            scopes: short.permissions,
            account_id: short.user_id,
        })
    }

    /// Refreshes the long-lived token itself (§3.5). The answer reports neither scopes nor an
    /// account id, so those fields of the result are empty: the caller keeps what it has.
    pub async fn refresh(
        &self,
        access_token: &SecretString,
        now: OffsetDateTime,
    ) -> Result<TokenSet, ProviderError> {
        let token = access_token.expose_secret();
        let what = "Instagram token refresh";
        let req = self
            .http
            .get(format!("{}/refresh_access_token", self.graph_base))
            .query(&[("grant_type", "ig_refresh_token"), ("access_token", token)]);
        let raw = send(req, what).await?;
        let (access_token, access_expires_at) = parse_long_lived(&raw, now, what, &[token])?;
        Ok(TokenSet {
            access_token,
            access_expires_at,
            refresh_token: None,
            refresh_expires_at: None,
            scopes: Vec::new(),
            account_id: None,
        })
    }

    /// Fetches `/me` (§3.6). The profile is keyed on `user_id` (the professional-account id);
    /// `id` is kept as the app-scoped id. Accounts that are not professional are refused.
    pub async fn fetch_profile(&self, access_token: &SecretString) -> Result<Profile, ProviderError> {
        let token = access_token.expose_secret();
        let what = "Instagram profile";
        let req = self
            .http
            .get(format!("{}/{}/me", self.graph_base, self.graph_api_version))
            .query(&[("fields", PROFILE_FIELDS)])
            .bearer_auth(token);
        let raw = send(req, what).await?;
        parse_profile(&raw, what, &[token])
    }
}

/// Instagram appends `#_` to the redirect; it is not part of the code.
fn strip_fragment(code: &str) -> &str {
    code.strip_suffix("#_").unwrap_or(code)
}

/// The first element of a `{data:[...]}` wrapper, or the object itself.
fn unwrap_data(obj: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Array(items)) = obj.get("data")
        && let Some(Value::Object(first)) = items.first()
    {
        return first.clone();
    }
    obj
}

/// Parses the `oauth/access_token` answer, flat or wrapped.
pub(super) fn parse_short_lived(
    raw: &RawResponse,
    what: &str,
    secrets: &[&str],
) -> Result<ShortLived, ProviderError> {
    let Some(Value::Object(obj)) = raw.json() else {
        return Err(status_error(raw, what));
    };
    if let Some(Value::Object(err)) = obj.get("error") {
        return Err(classify_graph(err, raw, what, secrets));
    }
    if obj.contains_key("error_type") || obj.contains_key("error_message") {
        return Err(classify_exchange_error(&obj, raw, what, secrets));
    }
    // A token is taken from a success status only (RFC 6749 §5.1), whatever the body holds.
    if !raw.is_success() {
        return Err(status_error(raw, what));
    }
    let payload = unwrap_data(obj);
    let Some(access_token) = payload.get("access_token").and_then(Value::as_str).filter(|s| !s.is_empty())
    else {
        return Err(ProviderError::Rejected {
            reason: format!("{what}: the answer carries no access_token"),
        });
    };
    Ok(ShortLived {
        access_token: SecretString::from(access_token.to_string()),
        user_id: payload.get("user_id").and_then(id_string),
        permissions: payload.get("permissions").map(scope_list).unwrap_or_default(),
    })
}

/// Parses a `{access_token, token_type, expires_in}` answer (long-lived exchange and refresh).
pub(super) fn parse_long_lived(
    raw: &RawResponse,
    now: OffsetDateTime,
    what: &str,
    secrets: &[&str],
) -> Result<(SecretString, OffsetDateTime), ProviderError> {
    let Some(Value::Object(obj)) = raw.json() else {
        return Err(status_error(raw, what));
    };
    if let Some(Value::Object(err)) = obj.get("error") {
        return Err(classify_graph(err, raw, what, secrets));
    }
    if obj.contains_key("error_type") || obj.contains_key("error_message") {
        return Err(classify_exchange_error(&obj, raw, what, secrets));
    }
    if !raw.is_success() {
        return Err(status_error(raw, what));
    }
    let obj = unwrap_data(obj);
    let Some(token) = obj.get("access_token").and_then(Value::as_str).filter(|s| !s.is_empty()) else {
        return Err(ProviderError::Rejected {
            reason: format!("{what}: the answer carries no access_token"),
        });
    };
    let Some(expires_in) = obj.get("expires_in").and_then(as_i64) else {
        return Err(ProviderError::Rejected { reason: format!("{what}: the answer carries no expires_in") });
    };
    Ok((SecretString::from(token.to_string()), expiry(now, expires_in, what)?))
}

/// Parses `/me`, flat or wrapped in `data:[...]`.
pub(super) fn parse_profile(
    raw: &RawResponse,
    what: &str,
    secrets: &[&str],
) -> Result<Profile, ProviderError> {
    let Some(Value::Object(obj)) = raw.json() else {
        return Err(status_error(raw, what));
    };
    if let Some(Value::Object(err)) = obj.get("error") {
        return Err(classify_graph(err, raw, what, secrets));
    }
    if !raw.is_success() {
        return Err(status_error(raw, what));
    }
    let me = unwrap_data(obj);
    let Some(user_id) = me.get("user_id").and_then(id_string) else {
        return Err(ProviderError::Rejected { reason: format!("{what}: the answer carries no user_id") });
    };
    // Instagram Login only serves professional accounts; an absent type is taken as such, a
    // present one must be BUSINESS or MEDIA_CREATOR.
    if let Some(kind) = me.get("account_type").and_then(Value::as_str)
        && !PROFESSIONAL_TYPES.contains(&kind)
    {
        return Err(ProviderError::Rejected {
            reason: format!(
                "{PERSONAL_ACCOUNT}: Instagram reports this account as {}; \
                     only professional (Business or Creator) accounts can be connected, so switch \
                     it to a professional account in the Instagram app and connect again",
                sanitize(kind, secrets)
            ),
        });
    }
    let text = |k: &str| me.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    Ok(Profile {
        account_id: user_id,
        username: text("username"),
        display_name: text("name"),
        avatar_url: text("profile_picture_url"),
        app_scoped_id: me.get("id").and_then(id_string),
        withheld_scopes: Vec::new(),
    })
}

/// Classifies the code-exchange error shape `{error_type, code, error_message}`.
fn classify_exchange_error(
    obj: &Map<String, Value>,
    raw: &RawResponse,
    what: &str,
    secrets: &[&str],
) -> ProviderError {
    let message = sanitize(&str_field(obj, "error_message"), secrets);
    let kind = sanitize(&str_field(obj, "error_type"), secrets);
    let code = obj.get("code").and_then(as_i64);
    let lower = message.to_ascii_lowercase();
    let code_dead = lower.contains("matching code")
        || (lower.contains("code")
            && (lower.contains("already used") || lower.contains("not found") || lower.contains("expired")));
    let detail = format!("{kind} {}: {message}", code.map(|c| c.to_string()).unwrap_or_default());
    // Only the 400 `OAuthException` is documented; the `code` of the others may be the HTTP
    // status or a Graph code, and the type may name the class, so all three are read.
    let kind_lower = kind.to_ascii_lowercase();
    let rate_limited = kind_lower.contains("ratelimit")
        || raw.status == 429
        || code.is_some_and(|c| matches!(c, 4 | 17 | 32 | 613 | 429));
    let unavailable = raw.is_retryable_status() || code.is_some_and(|c| matches!(c, 1 | 2) || c >= 500);
    let permission = kind_lower.contains("permission") || code == Some(10);
    if code_dead {
        ProviderError::Permanent {
            reason: format!(
                "{what}: Instagram did not accept the authorization code ({detail}); the account must be \
                 connected again"
            ),
        }
    } else if rate_limited {
        ProviderError::Transient {
            reason: format!("{what}: rate limited by Instagram ({detail})"),
            retry_after: raw.retry_after,
        }
    } else if unavailable {
        ProviderError::Transient {
            reason: format!("{what}: Instagram is unavailable for now ({detail})"),
            retry_after: raw.retry_after,
        }
    } else if permission {
        ProviderError::Scope { reason: format!("{what}: a permission was not granted ({detail})") }
    } else if lower.contains("client secret")
        || lower.contains("client_id")
        || lower.contains("platform app")
        || lower.contains("redirect")
    {
        // "Error validating client secret.", "Invalid platform app", a redirect URI that differs.
        ProviderError::Misconfigured {
            reason: format!("{what}: Instagram refused the app's credentials or redirect URI ({detail})"),
        }
    } else {
        ProviderError::Rejected { reason: format!("{what}: Instagram refused the request ({detail})") }
    }
}

/// Classifies a Graph error object (§3.7).
fn classify_graph(
    err: &Map<String, Value>,
    raw: &RawResponse,
    what: &str,
    secrets: &[&str],
) -> ProviderError {
    let code = err.get("code").and_then(as_i64);
    let subcode = err.get("error_subcode").and_then(as_i64);
    let is_transient = err.get("is_transient").and_then(Value::as_bool).unwrap_or(false);
    let message = sanitize(&str_field(err, "message"), secrets);
    let trace = str_field(err, "fbtrace_id");
    let mut detail = format!("code {}", code.map(|c| c.to_string()).unwrap_or_else(|| "?".into()));
    if let Some(s) = subcode {
        detail.push_str(&format!("/{s}"));
    }
    if !message.is_empty() {
        detail.push_str(&format!(": {message}"));
    }
    if !trace.is_empty() {
        detail.push_str(&format!(" (fbtrace_id {})", sanitize(&trace, secrets)));
    }
    match code {
        Some(190) => {
            let why = match subcode {
                Some(463) => "the access token has expired",
                Some(460) => "the password was changed or the session was invalidated",
                Some(458) => "the user removed the app",
                Some(459 | 464) => {
                    "the account is locked behind a checkpoint; the user must log in to Instagram"
                }
                Some(467) => "the access token is invalid",
                _ => "the access token is no longer valid",
            };
            ProviderError::Permanent {
                reason: format!("{what}: {why} ({detail}); the account must be connected again"),
            }
        }
        Some(10 | 200..=299) => {
            ProviderError::Scope { reason: format!("{what}: a permission was not granted ({detail})") }
        }
        Some(4 | 17 | 32 | 613) => ProviderError::Transient {
            reason: format!("{what}: rate limited by Instagram ({detail})"),
            retry_after: raw.retry_after,
        },
        _ if raw.status == 429 => ProviderError::Transient {
            reason: format!("{what}: rate limited by Instagram (HTTP 429, {detail})"),
            retry_after: raw.retry_after,
        },
        _ if code == Some(101) || message.to_ascii_lowercase().contains("client secret") => {
            ProviderError::Misconfigured {
                reason: format!("{what}: Instagram refused the app's credentials ({detail})"),
            }
        }
        Some(1 | 2) => ProviderError::Transient {
            reason: format!("{what}: Instagram is unavailable for now ({detail})"),
            retry_after: raw.retry_after,
        },
        _ if is_transient || raw.status >= 500 => ProviderError::Transient {
            reason: format!("{what}: Instagram is unavailable for now ({detail})"),
            retry_after: raw.retry_after,
        },
        _ => ProviderError::Rejected { reason: format!("{what}: Instagram refused the request ({detail})") },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse { status, retry_after: None, body: body.into() }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_764_000_000).unwrap()
    }

    #[test]
    fn authorize_url_has_no_pkce() {
        let c = Config::load_from(None, &[]).unwrap();
        let ig = Instagram::from_config(&c, reqwest::Client::new());
        let url = ig.authorize_url(&AuthorizeRequest {
            state: "st",
            code_verifier: "unused",
            redirect_uri: "http://127.0.0.1:8080/oauth/instagram/callback",
        });
        assert_eq!(url.path(), "/sandbox/instagram/oauth/authorize");
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["client_id"], crate::sandbox::INSTAGRAM_CLIENT_ID);
        assert_eq!(q["redirect_uri"], "http://127.0.0.1:8080/oauth/instagram/callback");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["scope"], "instagram_business_basic");
        assert_eq!(q["state"], "st");
        assert!(!q.contains_key("code_challenge"));
    }

    #[test]
    fn fragment_suffix_is_stripped() {
        assert_eq!(strip_fragment("AQBcode#_"), "AQBcode");
        assert_eq!(strip_fragment("AQBcode"), "AQBcode");
        assert_eq!(strip_fragment("AQB#_code"), "AQB#_code");
    }

    #[test]
    fn flat_answer_with_huge_numeric_user_id_and_array_permissions() {
        let body = r#"{"access_token":"IGAAx","user_id":27640875392278831,
            "permissions":["instagram_business_basic","instagram_business_content_publish"]}"#;
        let s = parse_short_lived(&raw(200, body), "x", &[]).unwrap();
        assert_eq!(s.access_token.expose_secret(), "IGAAx");
        assert_eq!(s.user_id.as_deref(), Some("27640875392278831"));
        assert_eq!(s.permissions, vec!["instagram_business_basic", "instagram_business_content_publish"]);
    }

    #[test]
    fn wrapped_answer_with_string_user_id_and_comma_permissions() {
        let body = r#"{"data":[{"access_token":"IGAAy","user_id":"17841400000000001",
            "permissions":"instagram_business_basic,instagram_business_manage_comments"}]}"#;
        let s = parse_short_lived(&raw(200, body), "x", &[]).unwrap();
        assert_eq!(s.access_token.expose_secret(), "IGAAy");
        assert_eq!(s.user_id.as_deref(), Some("17841400000000001"));
        assert_eq!(s.permissions, vec!["instagram_business_basic", "instagram_business_manage_comments"]);
    }

    #[test]
    fn exchange_errors() {
        let used = r#"{"error_type":"OAuthException","code":400,"error_message":"Matching code was not found or was already used"}"#;
        assert!(matches!(parse_short_lived(&raw(400, used), "x", &[]), Err(ProviderError::Permanent { .. })));
        let secret =
            r#"{"error_type":"OAuthException","code":400,"error_message":"Error validating client secret."}"#;
        assert!(matches!(
            parse_short_lived(&raw(400, secret), "x", &[]),
            Err(ProviderError::Misconfigured { .. })
        ));
        let redirect = r#"{"error_type":"OAuthException","code":400,"error_message":"Error validating verification code. Please make sure your redirect_uri is identical to the one you used in the OAuth dialog request"}"#;
        assert!(matches!(
            parse_short_lived(&raw(400, redirect), "x", &[]),
            Err(ProviderError::Misconfigured { .. })
        ));
        let app = r#"{"error_type":"OAuthException","code":400,"error_message":"Invalid platform app"}"#;
        assert!(matches!(
            parse_short_lived(&raw(400, app), "x", &[]),
            Err(ProviderError::Misconfigured { .. })
        ));
        let other = r#"{"error_type":"OAuthException","code":400,"error_message":"Invalid parameter"}"#;
        assert!(matches!(parse_short_lived(&raw(400, other), "x", &[]), Err(ProviderError::Rejected { .. })));
        let busy = r#"{"error_type":"OAuthException","code":500,"error_message":"Unknown error"}"#;
        assert!(matches!(parse_short_lived(&raw(500, busy), "x", &[]), Err(ProviderError::Transient { .. })));
        assert!(matches!(
            parse_short_lived(&raw(502, "<html>"), "x", &[]),
            Err(ProviderError::Transient { .. })
        ));
        // Rate limits, whether the status, the type or a Graph code says so.
        for (status, body) in [
            (429, r#"{"error_type":"OAuthRateLimitException","code":429,"error_message":"Too many"}"#),
            (400, r#"{"error_type":"OAuthRateLimitException","code":4,"error_message":"Limit reached"}"#),
            (
                400,
                r#"{"error_type":"OAuthException","code":17,"error_message":"User request limit reached"}"#,
            ),
            (503, r#"{"error_type":"OAuthException","code":503,"error_message":"Unavailable"}"#),
            (
                400,
                r#"{"error_type":"OAuthException","code":2,"error_message":"Service temporarily unavailable"}"#,
            ),
        ] {
            assert!(parse_short_lived(&raw(status, body), "x", &[]).unwrap_err().is_transient(), "{body}");
        }
        let permission =
            r#"{"error_type":"OAuthPermissionsException","code":400,"error_message":"No permission"}"#;
        assert!(matches!(
            parse_short_lived(&raw(400, permission), "x", &[]),
            Err(ProviderError::Scope { .. })
        ));
        assert!(matches!(
            parse_short_lived(&raw(200, "<html>"), "x", &[]),
            Err(ProviderError::Rejected { .. })
        ));
    }

    #[test]
    fn long_lived_answer() {
        let body = r#"{"access_token":"IGAAlong","token_type":"bearer","expires_in":5183944}"#;
        let (t, exp) = parse_long_lived(&raw(200, body), now(), "x", &[]).unwrap();
        assert_eq!(t.expose_secret(), "IGAAlong");
        assert_eq!(exp, now() + time::Duration::seconds(5_183_944));
    }

    fn graph(status: u16, code: i64, subcode: Option<i64>, transient: bool) -> ProviderError {
        let mut err = serde_json::json!({"message":"m","type":"OAuthException","code":code,"fbtrace_id":"T"});
        if let Some(s) = subcode {
            err["error_subcode"] = s.into();
        }
        if transient {
            err["is_transient"] = true.into();
        }
        let body = serde_json::json!({ "error": err }).to_string();
        parse_long_lived(&raw(status, &body), now(), "x", &[]).unwrap_err()
    }

    #[test]
    fn graph_errors_are_classified() {
        for (sub, word) in [(463, "expired"), (460, "password"), (458, "removed")] {
            let ProviderError::Permanent { reason } = graph(400, 190, Some(sub), false) else { panic!() };
            assert!(reason.contains(word), "{reason}");
        }
        assert!(matches!(graph(400, 190, None, false), ProviderError::Permanent { .. }));
        assert!(matches!(graph(400, 10, None, false), ProviderError::Scope { .. }));
        assert!(matches!(graph(403, 200, None, false), ProviderError::Scope { .. }));
        for code in [4, 17, 32, 613, 1, 2] {
            assert!(graph(400, code, None, false).is_transient(), "{code}");
        }
        assert!(graph(400, 100, None, true).is_transient());
        assert!(graph(429, 100, None, false).is_transient());
        // A refused client secret is the operator's settings, whatever code it comes with.
        assert!(matches!(graph(400, 101, None, false), ProviderError::Misconfigured { .. }));
        for code in [1, 101, 190_000] {
            let body = serde_json::json!({"error": {"message": "Error validating client secret.", "type": "OAuthException", "code": code}});
            let e = classify_graph(body["error"].as_object().unwrap(), &raw(400, "{}"), "x", &[]);
            assert!(matches!(e, ProviderError::Misconfigured { .. }), "{code}: {e:?}");
        }
        assert!(matches!(graph(400, 100, None, false), ProviderError::Rejected { .. }));
        let mut r = raw(429, r#"{"error":{"code":4,"message":"Application request limit reached"}}"#);
        r.retry_after = Some(Duration::from_secs(7));
        let ProviderError::Transient { retry_after, .. } = parse_profile(&r, "x", &[]).unwrap_err() else {
            panic!()
        };
        assert_eq!(retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn profile_flat_wrapped_and_personal() {
        let flat = r#"{"id":"27640875392278831","user_id":17841400000000001,"username":"biz","name":"Biz",
            "account_type":"BUSINESS","profile_picture_url":"https://cdn/x.jpg"}"#;
        let p = parse_profile(&raw(200, flat), "x", &[]).unwrap();
        assert_eq!(p.account_id, "17841400000000001");
        assert_eq!(p.app_scoped_id.as_deref(), Some("27640875392278831"));
        assert_eq!(p.username.as_deref(), Some("biz"));
        assert_eq!(p.display_name.as_deref(), Some("Biz"));
        assert_eq!(p.avatar_url.as_deref(), Some("https://cdn/x.jpg"));

        let wrapped = r#"{"data":[{"id":"1","user_id":"17841400000000003","username":"c","account_type":"MEDIA_CREATOR"}]}"#;
        assert_eq!(parse_profile(&raw(200, wrapped), "x", &[]).unwrap().account_id, "17841400000000003");

        let personal = r#"{"id":"1","user_id":"5","username":"p","account_type":"PERSONAL"}"#;
        let ProviderError::Rejected { reason } = parse_profile(&raw(200, personal), "x", &[]).unwrap_err()
        else {
            panic!()
        };
        assert!(reason.starts_with("personal accounts cannot be connected"), "{reason}");
    }

    #[test]
    fn graph_reasons_never_echo_tokens() {
        let body = r#"{"error":{"message":"Invalid OAuth access token IGAAsecret123","code":190}}"#;
        let e = parse_profile(&raw(400, body), "x", &["IGAAsecret123"]).unwrap_err();
        assert!(!e.to_string().contains("IGAAsecret123"), "{e}");
    }

    proptest::proptest! {
        /// Whatever Instagram answers (its exchange error shape, a Graph error, a wrapped or
        /// flat body, an HTML page), whatever the status, and wherever it echoes a secret we
        /// sent, plainly, percent-encoded or with control characters in it, no error's reason
        /// holds the secret.
        #[test]
        fn no_answer_puts_a_secret_in_a_reason(
            secret in "IGAA[A-Za-z0-9_+/=-]{8,60}",
            before in "\\PC{0,30}",
            after in "\\PC{0,30}",
            split in 0usize..8,
            encode in proptest::bool::ANY,
            status in proptest::sample::select(vec![200u16, 400, 401, 403, 429, 500, 503]),
        ) {
            let mut echoed = secret.clone();
            if split > 0 {
                echoed.insert(split, '\u{7}');
            }
            if encode {
                echoed = url::form_urlencoded::byte_serialize(echoed.as_bytes()).collect();
            }
            let text = format!("{before}{echoed}{after}");
            let bodies = [
                serde_json::json!({"error_type": "OAuthException", "code": 400, "error_message": text}).to_string(),
                serde_json::json!({"error": {"message": text, "type": "OAuthException", "code": 190,
                    "error_subcode": 463, "fbtrace_id": "T"}}).to_string(),
                serde_json::json!({"error": {"message": "x", "type": text, "code": 4, "is_transient": true}})
                    .to_string(),
                serde_json::json!({"data": [{"user_id": "1", "account_type": text}]}).to_string(),
                text.clone(),
                format!("<html><p>{text}</p></html>"),
            ];
            for body in bodies {
                let answer = raw(status, &body);
                let errors = [
                    parse_short_lived(&answer, "token exchange", &[&secret]).err(),
                    parse_long_lived(&answer, now(), "long-lived exchange", &[&secret]).err(),
                    parse_profile(&answer, "profile", &[&secret]).err(),
                ];
                for e in errors.into_iter().flatten() {
                    proptest::prop_assert!(!e.to_string().contains(&secret), "{body} -> {e}");
                }
            }
        }

        /// A token or a profile is taken from a success status only.
        #[test]
        fn error_statuses_never_succeed(
            status in proptest::sample::select(vec![400u16, 401, 403, 404, 429, 500, 502, 503]),
            body in proptest::sample::select(vec![
                r#"{"access_token":"IGAAx","user_id":"1","permissions":"instagram_business_basic"}"#,
                r#"{"data":[{"access_token":"IGAAx","user_id":"1","permissions":[]}]}"#,
                r#"{"access_token":"IGAAx","token_type":"bearer","expires_in":5183944}"#,
                r#"{"user_id":"1","username":"u","account_type":"BUSINESS"}"#,
                "", "{}", "<html>bad gateway</html>",
            ]),
        ) {
            let answer = raw(status, body);
            proptest::prop_assert!(parse_short_lived(&answer, "x", &[]).is_err());
            proptest::prop_assert!(parse_long_lived(&answer, now(), "x", &[]).is_err());
            proptest::prop_assert!(parse_profile(&answer, "x", &[]).is_err());
        }
    }
}
