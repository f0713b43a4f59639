//! TikTok Login Kit for Web (OAuth v2), per providers.md §2.
//!
//! The wire quirks this adapter handles:
//! - the client id is called `client_key`, and scopes are comma-joined;
//! - PKCE is always used, with TikTok's **hex** S256 challenge, and `code_verifier` is always sent
//!   on the exchange (§2.3);
//! - the token endpoint answers a flat object on success and `{error, error_description, log_id}`
//!   on failure, with an HTTP status that is not documented, so the body decides (§2.4);
//! - refresh tokens rotate (§2.5); an answer without `refresh_token` means "keep the old one";
//! - the user-info API wraps its answer in `{data:{user}, error:{code,message,log_id}}`, and the
//!   docs print the error struct flat, so both are read (§2.7, §2.8).
//!
//! Failures are classified per providers.md §9.3 (see `classify`). Reasons never contain the
//! code, the verifier, a token or the client secret: every text that comes from the provider is
//! passed through `sanitize` with those values before it reaches a reason.
//!
//! The small HTTP helpers at the bottom (`send`, `sanitize`, `status_error`, ...) are shared
//! with the Instagram adapter.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use time::OffsetDateTime;
use url::Url;

use super::{AuthorizeRequest, Profile, ProviderError, TokenSet, pkce};
use crate::config::Config;

/// The profile fields asked for; `username` needs `user.info.profile`.
const PROFILE_FIELDS: &str = "open_id,union_id,avatar_url,display_name,username";
/// The scope `username` needs.
const PROFILE_SCOPE: &str = "user.info.profile";
/// The fields covered by `user.info.basic` alone, asked for when the grant lacks
/// `user.info.profile` (a partial grant).
const BASIC_PROFILE_FIELDS: &str = "open_id,union_id,avatar_url,display_name";
/// The scopes beyond `user.info.basic` whose withdrawal the user-info call can show, each with
/// a field only it covers (§2.7). A health check asks for the fields of those the grant holds.
const PROBED_SCOPES: [(&str, &str); 2] = [(PROFILE_SCOPE, "username"), ("user.info.stats", "follower_count")];

/// The TikTok adapter.
#[derive(Debug, Clone)]
pub struct TikTok {
    /// Whether this adapter points at the built-in sandbox.
    pub sandbox: bool,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    client_key: String,
    client_secret: SecretString,
    authorize_url: Url,
    token_url: Url,
    /// Base of the v2 API, without a trailing slash (`https://open.tiktokapis.com`).
    api_base: String,
    http: reqwest::Client,
}

impl TikTok {
    /// Builds the adapter from the configuration: the configured endpoints and credentials, or the
    /// built-in sandbox (`{public_url}/sandbox/tiktok/...` with its fixed test credentials) when
    /// the provider runs in sandbox mode.
    pub fn from_config(config: &Config, http: reqwest::Client) -> Self {
        let c = &config.providers.tiktok;
        if c.is_sandbox() {
            Self {
                sandbox: true,
                scopes: c.scopes.clone(),
                client_key: crate::sandbox::TIKTOK_CLIENT_KEY.to_string(),
                client_secret: SecretString::from(crate::sandbox::TIKTOK_CLIENT_SECRET),
                authorize_url: public_url(config, "/sandbox/tiktok/v2/auth/authorize/"),
                token_url: public_url(config, "/sandbox/tiktok/v2/oauth/token/"),
                api_base: config.public("/sandbox/tiktok"),
                http,
            }
        } else {
            Self {
                sandbox: false,
                scopes: c.scopes.clone(),
                client_key: c.client_key.clone().unwrap_or_default(),
                client_secret: c.client_secret.clone().unwrap_or_else(|| SecretString::from("")),
                authorize_url: c.authorize_url.clone(),
                token_url: c.token_url.clone(),
                api_base: c.api_base_url.as_str().trim_end_matches('/').to_string(),
                http,
            }
        }
    }

    /// The authorization URL (§2.1): `client_key`, comma-joined `scope`, `redirect_uri`, `state`,
    /// `response_type=code` and the hex S256 challenge. The trailing slash of the path is kept.
    pub fn authorize_url(&self, req: &AuthorizeRequest<'_>) -> Url {
        debug_assert!(!req.code_verifier.is_empty(), "TikTok's flow always takes a PKCE verifier");
        let mut url = self.authorize_url.clone();
        url.query_pairs_mut()
            .append_pair("client_key", &self.client_key)
            .append_pair("scope", &self.scopes.join(","))
            .append_pair("redirect_uri", req.redirect_uri)
            .append_pair("state", req.state)
            .append_pair("response_type", "code")
            .append_pair("code_challenge", &pkce::s256_hex(req.code_verifier))
            .append_pair("code_challenge_method", "S256");
        url
    }

    /// Exchanges an authorization code (already URL-decoded) for tokens (§2.4).
    pub async fn exchange_code(
        &self,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
        now: OffsetDateTime,
    ) -> Result<TokenSet, ProviderError> {
        let secret = self.client_secret.expose_secret();
        let form = [
            ("client_key", self.client_key.as_str()),
            ("client_secret", secret),
            ("code", code),
            ("grant_type", "authorization_code"),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier),
        ];
        let secrets = [secret, code, code_verifier];
        let what = "TikTok code exchange";
        let raw = send(self.http.post(self.token_url.clone()).form(&form), what).await?;
        parse_token_answer(&raw, now, what, &secrets)
    }

    /// Refreshes with a refresh token (§2.5). TikTok rotates refresh tokens: the answer's
    /// `refresh_token` replaces the one sent, which dies at once. When the answer carries none,
    /// [`TokenSet::refresh_token`] is `None` and the caller keeps the old one.
    pub async fn refresh(
        &self,
        refresh_token: &SecretString,
        now: OffsetDateTime,
    ) -> Result<TokenSet, ProviderError> {
        let secret = self.client_secret.expose_secret();
        let rt = refresh_token.expose_secret();
        let form = [
            ("client_key", self.client_key.as_str()),
            ("client_secret", secret),
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
        ];
        let what = "TikTok token refresh";
        let raw = send(self.http.post(self.token_url.clone()).form(&form), what).await?;
        parse_token_answer(&raw, now, what, &[secret, rt])
    }

    /// Fetches the profile (§2.7). `username` needs `user.info.profile`; when TikTok answers that a
    /// scope is missing (a partial grant), the profile is fetched again with the basic fields only,
    /// so a connection is not lost for want of a handle, and `withheld_scopes` says so.
    pub async fn fetch_profile(&self, access_token: &SecretString) -> Result<Profile, ProviderError> {
        match self.fetch_user(access_token, PROFILE_FIELDS).await {
            Err(ProviderError::Scope { .. }) => {
                let mut profile = self.fetch_user(access_token, BASIC_PROFILE_FIELDS).await?;
                profile.withheld_scopes = vec![PROFILE_SCOPE.to_string()];
                Ok(profile)
            }
            other => other,
        }
    }

    /// Fetches the profile and checks the grant with it (a health check): asks as well for a field
    /// of each scope in `granted` that the user-info call can show (`user.info.profile`,
    /// `user.info.stats`). When TikTok refuses them, each such scope is asked for alone to learn
    /// which the user withdrew; `withheld_scopes` names those. When each answers alone, nothing
    /// was withdrawn: the grant is whole, whatever the refusal of them together said.
    pub async fn check_profile(
        &self,
        access_token: &SecretString,
        granted: &[String],
    ) -> Result<Profile, ProviderError> {
        let probes: Vec<(&str, &str)> =
            PROBED_SCOPES.into_iter().filter(|(scope, _)| granted.iter().any(|g| g == scope)).collect();
        let fields = |extra: &[(&str, &str)]| {
            extra.iter().fold(BASIC_PROFILE_FIELDS.to_string(), |all, (_, field)| format!("{all},{field}"))
        };
        let refused = match self.fetch_user(access_token, &fields(&probes)).await {
            Err(refused @ ProviderError::Scope { .. }) if !probes.is_empty() => refused,
            other => return other,
        };
        let mut withheld = Vec::new();
        let mut profile: Option<Profile> = None;
        if probes.len() == 1 {
            withheld.push(probes[0].0.to_string());
        } else {
            for probe in &probes {
                match self.fetch_user(access_token, &fields(&[*probe])).await {
                    // The answer with the handle is the one kept.
                    Ok(p) if profile.as_ref().is_none_or(|kept| kept.username.is_none()) => profile = Some(p),
                    Ok(_) => {}
                    Err(ProviderError::Scope { .. }) => withheld.push(probe.0.to_string()),
                    Err(e) => return Err(e),
                }
            }
            if withheld.is_empty() {
                // Each scope answers alone but not together: TikTok served every scope of the
                // grant just now, so the connection is not broken over the refusal of the two.
                tracing::warn!(error = %refused, "TikTok refused the granted scopes together but served each alone");
            }
        }
        let mut profile = match profile {
            Some(p) => p,
            None => self.fetch_user(access_token, BASIC_PROFILE_FIELDS).await?,
        };
        profile.withheld_scopes = withheld;
        Ok(profile)
    }

    async fn fetch_user(&self, access_token: &SecretString, fields: &str) -> Result<Profile, ProviderError> {
        let token = access_token.expose_secret();
        let url = format!("{}/v2/user/info/", self.api_base);
        let req = self.http.get(url).query(&[("fields", fields)]).bearer_auth(token);
        let what = "TikTok user info";
        let raw = send(req, what).await?;
        parse_user_info(&raw, what, &[token])
    }

    /// Revokes the grant (§2.6): `POST {api}/v2/oauth/revoke/` with the access token. Success is
    /// a 2xx with an empty body, `{}`, or any object without an error.
    pub async fn revoke(&self, access_token: &SecretString) -> Result<(), ProviderError> {
        let secret = self.client_secret.expose_secret();
        let token = access_token.expose_secret();
        let form = [("client_key", self.client_key.as_str()), ("client_secret", secret), ("token", token)];
        let url = format!("{}/v2/oauth/revoke/", self.api_base);
        let what = "TikTok revoke";
        let raw = send(self.http.post(url).form(&form), what).await?;
        parse_revoke_answer(&raw, what, &[secret, token])
    }
}

/// Parses a token-endpoint answer (code exchange or refresh).
pub(super) fn parse_token_answer(
    raw: &RawResponse,
    now: OffsetDateTime,
    what: &str,
    secrets: &[&str],
) -> Result<TokenSet, ProviderError> {
    let Some(Value::Object(mut obj)) = raw.json() else {
        return Err(status_error(raw, what));
    };
    // The legacy v1 wrapper `{data:{...}, message}` still shows on old pages; unwrap it when the
    // top level carries neither a token nor an error.
    if !obj.contains_key("access_token")
        && !obj.contains_key("error")
        && let Some(Value::Object(data)) = obj.get("data")
    {
        let mut data = data.clone();
        let failed = data.get("error_code").and_then(as_i64).is_some_and(|c| c != 0);
        if failed && !data.contains_key("error") {
            let code = data.get("error_code").and_then(as_i64).unwrap_or_default();
            data.insert("error".into(), Value::String(format!("error_code {code}")));
        }
        if failed
            && !data.contains_key("error_description")
            && let Some(d) = data.get("description").cloned()
        {
            data.insert("error_description".into(), d);
        }
        obj = data;
    }
    if let Some(err) = obj.get("error").filter(|e| !e.is_null()) {
        let (code, message, log_id) = match err {
            // The API-style struct, should the token endpoint ever answer with it.
            Value::Object(e) => (str_field(e, "code"), str_field(e, "message"), str_field(e, "log_id")),
            other => (
                other.as_str().map(str::to_string).unwrap_or_else(|| other.to_string()),
                str_field(&obj, "error_description"),
                str_field(&obj, "log_id"),
            ),
        };
        if !(code.is_empty() || code == "ok") {
            return Err(classify(&code, &message, &log_id, raw, what, secrets));
        }
    }
    // A token is taken from a success status only (RFC 6749 §5.1), whatever the body holds.
    if !raw.is_success() {
        return Err(status_error(raw, what));
    }
    let access_token = obj.get("access_token").and_then(Value::as_str).filter(|s| !s.is_empty());
    let Some(access_token) = access_token else {
        return Err(ProviderError::Rejected {
            reason: format!("{what}: the answer carries no access_token"),
        });
    };
    let refresh_token = obj
        .get("refresh_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_string()));
    let access_expires_at = match obj.get("expires_in").and_then(as_i64).map(|secs| expiry(now, secs, what)) {
        Some(Ok(at)) => at,
        // Beside a new refresh token, a lifetime missing or out of range does not throw the
        // answer away: the provider may already have retired the refresh token this one
        // replaces (providers.md: save any refresh token it returns). The access token is given
        // an hour (TikTok documents 24 hours, and lately 2), so that it is refreshed well before it could expire, but
        // not at once and again at every read, as it would be if counted as expired.
        _ if refresh_token.is_some() => {
            tracing::warn!(
                what,
                "the answer's expires_in is missing or out of range; its access token is given an hour"
            );
            now + UNKNOWN_ACCESS_LIFETIME
        }
        None => {
            return Err(ProviderError::Rejected {
                reason: format!("{what}: the answer carries no expires_in"),
            });
        }
        Some(Err(e)) => return Err(e),
    };
    let refresh_expires_at = match obj.get("refresh_expires_in").and_then(as_i64) {
        // (Out of range: unknown, as when absent.)
        Some(secs) if refresh_token.is_some() => expiry(now, secs, what).ok(),
        _ => None,
    };
    let scopes = obj.get("scope").map(scope_list).unwrap_or_default();
    let account_id = obj.get("open_id").and_then(id_string);
    Ok(TokenSet {
        access_token: SecretString::from(access_token.to_string()),
        access_expires_at,
        refresh_token,
        refresh_expires_at,
        scopes,
        account_id,
    })
}

/// The lifetime assumed for an access token whose answer gave none that can be read (beside a
/// new refresh token, which is kept).
const UNKNOWN_ACCESS_LIFETIME: time::Duration = time::Duration::hours(1);

/// Parses a `/v2/user/info/` answer.
pub(super) fn parse_user_info(
    raw: &RawResponse,
    what: &str,
    secrets: &[&str],
) -> Result<Profile, ProviderError> {
    let Some(Value::Object(obj)) = raw.json() else {
        return Err(status_error(raw, what));
    };
    let error = match obj.get("error") {
        Some(Value::Object(e)) => {
            Some((str_field(e, "code"), str_field(e, "message"), str_field(e, "log_id")))
        }
        // The OAuth shape, e.g. from a gateway in front of the API.
        Some(Value::String(code)) => {
            Some((code.clone(), str_field(&obj, "error_description"), str_field(&obj, "log_id")))
        }
        // The flat struct the docs print.
        _ => obj
            .get("code")
            .and_then(Value::as_str)
            .map(|code| (code.to_string(), str_field(&obj, "message"), str_field(&obj, "log_id"))),
    };
    match &error {
        Some((code, message, log_id)) if !code.is_empty() && code != "ok" => {
            return Err(classify(code, message, log_id, raw, what, secrets));
        }
        _ if !raw.is_success() => return Err(status_error(raw, what)),
        _ => {}
    }
    let user = obj.get("data").and_then(|d| d.get("user")).and_then(Value::as_object);
    let Some(user) = user else {
        return Err(ProviderError::Rejected { reason: format!("{what}: the answer carries no data.user") });
    };
    let Some(open_id) = user.get("open_id").and_then(id_string) else {
        return Err(ProviderError::Rejected { reason: format!("{what}: the answer carries no open_id") });
    };
    let text = |k: &str| user.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    Ok(Profile {
        account_id: open_id,
        username: text("username").map(|u| u.trim_start_matches('@').to_string()),
        display_name: text("display_name"),
        avatar_url: text("avatar_url"),
        app_scoped_id: None,
        withheld_scopes: Vec::new(),
    })
}

/// Parses a revoke answer.
pub(super) fn parse_revoke_answer(
    raw: &RawResponse,
    what: &str,
    secrets: &[&str],
) -> Result<(), ProviderError> {
    if raw.body.trim().is_empty() {
        return if raw.is_success() { Ok(()) } else { Err(status_error(raw, what)) };
    }
    let Some(Value::Object(obj)) = raw.json() else {
        return Err(status_error(raw, what));
    };
    let error = match obj.get("error") {
        Some(Value::String(code)) => Some((code.clone(), str_field(&obj, "error_description"))),
        Some(Value::Object(e)) => Some((str_field(e, "code"), str_field(e, "message"))),
        _ => None,
    };
    match error {
        Some((code, message)) if !code.is_empty() && code != "ok" => {
            Err(classify(&code, &message, &str_field(&obj, "log_id"), raw, what, secrets))
        }
        _ if raw.is_success() => Ok(()),
        _ => Err(status_error(raw, what)),
    }
}

/// Classifies a TikTok error code (OAuth `error` or API `error.code`), per providers.md §9.3.
fn classify(
    code: &str,
    message: &str,
    log_id: &str,
    raw: &RawResponse,
    what: &str,
    secrets: &[&str],
) -> ProviderError {
    let code = sanitize(code, secrets);
    let mut detail = sanitize(message, secrets);
    if detail.is_empty() {
        detail = "no description".into();
    }
    let log =
        if log_id.is_empty() { String::new() } else { format!(" (log_id {})", sanitize(log_id, secrets)) };
    match code.as_str() {
        "invalid_grant" => ProviderError::Permanent {
            reason: format!(
                "{what}: TikTok no longer accepts this authorization (invalid_grant: {detail}){log}; \
                 the account must be connected again"
            ),
        },
        // Not yet permanent: a refresh may issue a token that works (§9.3).
        "access_token_invalid" => ProviderError::AccessTokenInvalid {
            reason: format!(
                "{what}: TikTok no longer accepts the access token (access_token_invalid: {detail}){log}"
            ),
        },
        "scope_not_authorized" | "scope_permission_missed" => ProviderError::Scope {
            reason: format!("{what}: a scope was not granted ({code}: {detail}){log}"),
        },
        "server_error" | "temporarily_unavailable" | "internal_error" | "rate_limit_exceeded" => {
            ProviderError::Transient {
                reason: format!("{what}: TikTok is unavailable for now ({code}: {detail}){log}"),
                retry_after: raw.retry_after,
            }
        }
        _ if raw.is_retryable_status() => ProviderError::Transient {
            reason: format!("{what}: HTTP {} ({code}: {detail}){log}", raw.status),
            retry_after: raw.retry_after,
        },
        // The client key or secret, or a redirect URI the app does not list (TikTok answers
        // `invalid_request` for it, naming the redirect URI; a PKCE mismatch also answers
        // `invalid_request`, and is no setting of the operator's).
        "invalid_client" | "unauthorized_client" => ProviderError::Misconfigured {
            reason: format!("{what}: TikTok refused the app's credentials ({code}: {detail}){log}"),
        },
        "invalid_request" if detail.to_ascii_lowercase().contains("redirect") => {
            ProviderError::Misconfigured {
                reason: format!("{what}: TikTok refused the redirect URI ({code}: {detail}){log}"),
            }
        }
        _ => ProviderError::Rejected {
            reason: format!("{what}: TikTok refused the request ({code}: {detail}){log}"),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared with the Instagram adapter.
// ---------------------------------------------------------------------------------------------

/// The largest answer read from a provider; anything longer is cut off (and will not parse).
const MAX_BODY: usize = 1024 * 1024;

/// A provider's answer, read in full.
#[derive(Debug, Clone)]
pub(super) struct RawResponse {
    /// The HTTP status code.
    pub(super) status: u16,
    /// `Retry-After`, when given in seconds.
    pub(super) retry_after: Option<Duration>,
    /// The body as text (lossy UTF-8).
    pub(super) body: String,
}

impl RawResponse {
    /// Whether the status is 2xx.
    pub(super) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Whether the status alone says "try again later" (408, 429, 5xx).
    pub(super) fn is_retryable_status(&self) -> bool {
        matches!(self.status, 408 | 429) || self.status >= 500
    }

    /// The body as JSON, if it is JSON.
    pub(super) fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// The wait an answer's `Retry-After` asks for: delay-seconds, or an HTTP-date measured from the
/// answer's own `Date` (the provider's clock, so that a skew between the clocks does not count;
/// a date without a `Date` to measure it from is ignored).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name| headers.get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok());
    let value = text(reqwest::header::RETRY_AFTER)?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Any reference time will do for delay-seconds.
        return crate::net::parse_retry_after(value, time::OffsetDateTime::UNIX_EPOCH);
    }
    let sent = crate::net::http_date(text(reqwest::header::DATE)?.trim())?;
    crate::net::parse_retry_after(value, sent)
}

/// Sends a request and reads the answer. The URL is never logged or put in an error, because
/// Instagram's Graph calls carry the client secret and tokens in the query string.
pub(super) async fn send(req: reqwest::RequestBuilder, what: &str) -> Result<RawResponse, ProviderError> {
    let mut resp = req.send().await.map_err(|e| network_error(&e, what))?;
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers());
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| network_error(&e, what))? {
        let room = MAX_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    tracing::debug!(call = what, status, bytes = body.len(), "provider answered");
    Ok(RawResponse { status, retry_after, body: String::from_utf8_lossy(&body).into_owned() })
}

/// A network-level failure (timeout, refused connection, cut-off answer): always transient. The
/// reason is built from the error's kind only, never from its text, which names the URL.
pub(super) fn network_error(e: &reqwest::Error, what: &str) -> ProviderError {
    let kind = if e.is_timeout() {
        "the request timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the answer was cut off"
    } else {
        "the request failed"
    };
    tracing::debug!(call = what, kind, "provider call failed");
    ProviderError::Transient { reason: format!("{what}: {kind}"), retry_after: None }
}

/// An answer whose body says nothing usable (HTML from a proxy, garbage, or JSON without an
/// error): classified by its status. 408/429/5xx are transient; anything else is a refusal.
pub(super) fn status_error(raw: &RawResponse, what: &str) -> ProviderError {
    let body = raw.body.trim_start();
    let looks = if body.is_empty() {
        "an empty body"
    } else if body.starts_with('<') {
        "an HTML body"
    } else if raw.json().is_some() {
        "a JSON body without a usable result"
    } else {
        "an unparsable body"
    };
    if raw.is_retryable_status() {
        ProviderError::Transient {
            reason: format!("{what}: HTTP {} with {looks}", raw.status),
            retry_after: raw.retry_after,
        }
    } else {
        ProviderError::Rejected { reason: format!("{what}: HTTP {} with {looks}", raw.status) }
    }
}

/// Makes a provider-supplied text safe for a reason: removes any of `secrets` it echoes, as they
/// are or form-encoded (TikTok's codes hold `*` and `!`), drops control characters and caps its
/// length.
pub(super) fn sanitize(text: &str, secrets: &[&str]) -> String {
    let secrets: Vec<&str> = secrets.iter().copied().filter(|s| s.len() >= 4).collect();
    let strip = |s: &str| s.chars().filter(|c| !c.is_control()).collect::<String>();
    let redact = |mut s: String| {
        for secret in &secrets {
            s = s.replace(secret, "[redacted]");
        }
        s
    };
    // Control characters go first, so that none hides a secret from the redaction; then the
    // secrets as they are written; then any the text held escaped (decoding the text already
    // redacted, so that a secret holding `+` or `%` is caught in its plain form first).
    let plain = redact(strip(text));
    let decoded = strip(&percent_encoding::percent_decode_str(&plain.replace('+', " ")).decode_utf8_lossy());
    let out = if secrets.iter().any(|s| decoded.contains(s)) { redact(decoded) } else { plain };
    let kept: Vec<char> = out.chars().collect();
    let mut out: String = kept.iter().take(300).collect();
    if kept.len() > 300 {
        out.push('…');
    }
    out
}

/// A string field of a JSON object, or "".
pub(super) fn str_field(obj: &serde_json::Map<String, Value>, key: &str) -> String {
    match obj.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// An integer given as a JSON number or a numeric string.
pub(super) fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
            // `7200.0`: whole seconds all the same (`as` saturates).
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An id given as a string or as a JSON integer of any size (never through `f64`).
pub(super) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => n.as_u64().map(|u| u.to_string()).or_else(|| n.as_i64().map(|i| i.to_string())),
        _ => None,
    }
}

/// A scope list given as a comma- or space-separated string or as an array of strings.
pub(super) fn scope_list(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        for part in s.split(|c: char| c == ',' || c.is_whitespace()).filter(|p| !p.is_empty()) {
            if !out.iter().any(|o| o == part) {
                out.push(part.to_string());
            }
        }
    };
    match v {
        Value::String(s) => push(s),
        Value::Array(items) => items.iter().filter_map(Value::as_str).for_each(push),
        _ => {}
    }
    out
}

/// `now + seconds`, for `expires_in`-style fields; negative values count as zero.
pub(super) fn expiry(now: OffsetDateTime, seconds: i64, what: &str) -> Result<OffsetDateTime, ProviderError> {
    now.checked_add(time::Duration::seconds(seconds.max(0))).ok_or_else(|| ProviderError::Rejected {
        reason: format!("{what}: the answer's lifetime ({seconds} s) is out of range"),
    })
}

/// `{public_url}{path}` as a URL. Infallible: the public URL is a validated http(s) URL, and
/// replacing its path keeps it one.
pub(super) fn public_url(config: &Config, path: &str) -> Url {
    let mut url = config.public_url.clone();
    let base = url.path().trim_end_matches('/').to_string();
    url.set_path(&format!("{base}{path}"));
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date_from_the_answers_own_clock() {
        use reqwest::header::{DATE, HeaderMap, HeaderValue, RETRY_AFTER};
        let headers = |pairs: &[(reqwest::header::HeaderName, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(k.clone(), HeaderValue::from_static(v));
            }
            h
        };
        assert_eq!(retry_after(&headers(&[(RETRY_AFTER, "120")])), Some(Duration::from_secs(120)));
        // A date is measured from the answer's `Date`, whatever our clock says.
        let dated = headers(&[
            (RETRY_AFTER, "Wed, 21 Oct 2015 07:30:00 GMT"),
            (DATE, "Wed, 21 Oct 2015 07:28:00 GMT"),
        ]);
        assert_eq!(retry_after(&dated), Some(Duration::from_secs(120)));
        // Without a `Date` to measure it from, a date is not used; nor is a malformed value.
        assert_eq!(retry_after(&headers(&[(RETRY_AFTER, "Wed, 21 Oct 2015 07:30:00 GMT")])), None);
        assert_eq!(
            retry_after(&headers(&[(RETRY_AFTER, "soon"), (DATE, "Wed, 21 Oct 2015 07:28:00 GMT")])),
            None
        );
        assert_eq!(retry_after(&headers(&[])), None);
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_764_000_000).unwrap()
    }

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse { status, retry_after: None, body: body.into() }
    }

    fn config() -> Config {
        Config::load_from(None, &[("AUTHLINK_PUBLIC_URL".into(), "https://links.example.com/base/".into())])
            .unwrap()
    }

    /// A health check whose scopes TikTok refuses together but serves each alone finds the grant
    /// whole (nothing withheld), with the handle (a scope refused alone too is named: the
    /// integration tests reach that through the sandbox).
    #[tokio::test]
    async fn a_check_names_only_scopes_refused_alone() {
        use axum::extract::Query;
        async fn user_info(Query(q): Query<std::collections::HashMap<String, String>>) -> axum::Json<Value> {
            let fields = q.get("fields").cloned().unwrap_or_default();
            let refused = fields.contains("username") && fields.contains("follower_count");
            axum::Json(if refused {
                serde_json::json!({"data": {}, "error": {"code": "scope_not_authorized", "message": "no", "log_id": "l"}})
            } else {
                serde_json::json!({"data": {"user": {"open_id": "o", "display_name": "D", "username": "u"}},
                    "error": {"code": "ok", "message": "", "log_id": "l"}})
            })
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let app = axum::Router::new().route("/v2/user/info/", axum::routing::get(user_info));
            axum::serve(listener, app).await.unwrap();
        });
        let config = Config::load_from(
            None,
            &[
                ("AUTHLINK_PUBLIC_URL".into(), "https://links.example.com/".into()),
                ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY".into(), "key".into()),
                ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET".into(), "secret".into()),
                ("AUTHLINK_PROVIDERS__TIKTOK__API_BASE_URL".into(), base),
            ],
        )
        .unwrap();
        let t = TikTok::from_config(&config, reqwest::Client::new());
        assert!(!t.sandbox);
        let token = SecretString::from("token".to_string());
        let granted = ["user.info.basic", "user.info.profile", "user.info.stats"].map(String::from);
        let profile = t.check_profile(&token, &granted).await.unwrap();
        assert!(profile.withheld_scopes.is_empty(), "{:?}", profile.withheld_scopes);
        assert_eq!(profile.username.as_deref(), Some("u"));
    }

    #[test]
    fn authorize_url_has_every_parameter_and_a_hex_challenge() {
        let t = TikTok::from_config(&config(), reqwest::Client::new());
        assert!(t.sandbox);
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let url = t.authorize_url(&AuthorizeRequest {
            state: "st",
            code_verifier: verifier,
            redirect_uri: "https://links.example.com/base/oauth/tiktok/callback",
        });
        assert_eq!(url.path(), "/base/sandbox/tiktok/v2/auth/authorize/");
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["client_key"], crate::sandbox::TIKTOK_CLIENT_KEY);
        assert_eq!(q["scope"], "user.info.basic,user.info.profile");
        assert_eq!(q["redirect_uri"], "https://links.example.com/base/oauth/tiktok/callback");
        assert_eq!(q["state"], "st");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["code_challenge"], "13d31e961a1ad8ec2f16b10c4c982e0876a878ad6df144566ee1894acb70f9c3");
        assert_eq!(q["code_challenge_method"], "S256");
        assert!(!q.contains_key("client_id"));
    }

    #[test]
    fn live_mode_uses_configured_endpoints() {
        let c = Config::load_from(
            None,
            &[
                ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY".into(), "ck".into()),
                ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET".into(), "cs".into()),
            ],
        )
        .unwrap();
        let t = TikTok::from_config(&c, reqwest::Client::new());
        assert!(!t.sandbox);
        let url = t.authorize_url(&AuthorizeRequest { state: "s", code_verifier: "v", redirect_uri: "r" });
        assert!(url.as_str().starts_with("https://www.tiktok.com/v2/auth/authorize/?client_key=ck&"));
        assert_eq!(t.api_base, "https://open.tiktokapis.com");
    }

    #[test]
    fn flat_token_answer_is_parsed() {
        let body = r#"{"access_token":"act.abc","expires_in":86400,"open_id":"oid-1",
            "refresh_expires_in":31536000,"refresh_token":"rft.def","scope":"user.info.basic,user.info.profile",
            "token_type":"Bearer"}"#;
        let t = parse_token_answer(&raw(200, body), now(), "x", &[]).unwrap();
        assert_eq!(t.access_token.expose_secret(), "act.abc");
        assert_eq!(t.access_expires_at, now() + time::Duration::seconds(86400));
        assert_eq!(t.refresh_token.as_ref().unwrap().expose_secret(), "rft.def");
        assert_eq!(t.refresh_expires_at, Some(now() + time::Duration::seconds(31_536_000)));
        assert_eq!(t.scopes, vec!["user.info.basic", "user.info.profile"]);
        assert_eq!(t.account_id.as_deref(), Some("oid-1"));
    }

    #[test]
    fn refresh_answer_without_refresh_token_keeps_none() {
        let body = r#"{"access_token":"act.x","expires_in":"7200","open_id":"o","scope":"user.info.basic"}"#;
        let t = parse_token_answer(&raw(200, body), now(), "x", &[]).unwrap();
        assert!(t.refresh_token.is_none());
        assert!(t.refresh_expires_at.is_none());
        assert_eq!(t.access_expires_at, now() + time::Duration::seconds(7200));
    }

    #[test]
    fn a_new_refresh_token_is_kept_whatever_the_lifetimes_say() {
        for body in [
            r#"{"access_token":"act.x","refresh_token":"rft.new","open_id":"o"}"#,
            r#"{"access_token":"act.x","expires_in":"2h","refresh_token":"rft.new","open_id":"o"}"#,
            r#"{"access_token":"act.x","expires_in":9223372036854775807,"refresh_token":"rft.new",
                "refresh_expires_in":9223372036854775807,"open_id":"o"}"#,
        ] {
            let t = parse_token_answer(&raw(200, body), now(), "x", &[]).unwrap();
            assert_eq!(t.refresh_token.as_ref().unwrap().expose_secret(), "rft.new", "{body}");
            assert_eq!(t.access_expires_at, now() + super::UNKNOWN_ACCESS_LIFETIME, "{body}");
            assert_eq!(t.refresh_expires_at, None, "{body}");
        }
        // A whole number written as a float is read as such.
        let body = r#"{"access_token":"act.x","expires_in":7200.0,"refresh_token":"rft.new"}"#;
        let t = parse_token_answer(&raw(200, body), now(), "x", &[]).unwrap();
        assert_eq!(t.access_expires_at, now() + time::Duration::seconds(7200));
        // Without a refresh token to keep, an answer without a lifetime is refused as before.
        let body = r#"{"access_token":"act.x","open_id":"o"}"#;
        let e = parse_token_answer(&raw(200, body), now(), "x", &[]).unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }), "{e:?}");
    }

    #[test]
    fn legacy_v1_wrapper_is_unwrapped() {
        let body = r#"{"data":{"access_token":"act.x","expires_in":86400,"open_id":"o","scope":"user.info.basic",
            "refresh_token":"rft.y","refresh_expires_in":100,"error_code":0,"description":""},"message":"success"}"#;
        let t = parse_token_answer(&raw(200, body), now(), "x", &[]).unwrap();
        assert_eq!(t.account_id.as_deref(), Some("o"));
        let body =
            r#"{"data":{"error_code":10007,"description":"Authorization code expired"},"message":"error"}"#;
        let e = parse_token_answer(&raw(200, body), now(), "x", &[]).unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }), "{e:?}");
    }

    #[test]
    fn oauth_errors_are_classified_whatever_the_status() {
        let err = |status, error: &str| {
            let body = format!(r#"{{"error":"{error}","error_description":"d","log_id":"L1"}}"#);
            parse_token_answer(&raw(status, &body), now(), "x", &[]).unwrap_err()
        };
        for status in [200, 400, 401] {
            assert!(matches!(err(status, "invalid_grant"), ProviderError::Permanent { .. }));
            assert!(matches!(err(status, "invalid_client"), ProviderError::Misconfigured { .. }));
            assert!(matches!(err(status, "unauthorized_client"), ProviderError::Misconfigured { .. }));
            assert!(matches!(err(status, "invalid_request"), ProviderError::Rejected { .. }));
            assert!(matches!(err(status, "server_error"), ProviderError::Transient { .. }));
            assert!(matches!(err(status, "temporarily_unavailable"), ProviderError::Transient { .. }));
            assert!(matches!(err(status, "scope_not_authorized"), ProviderError::Scope { .. }));
        }
        assert!(matches!(err(503, "something_new"), ProviderError::Transient { .. }));
        // A redirect URI the app does not list is the operator's to fix; another bad request
        // (a PKCE verifier that does not match) is not.
        let body =
            r#"{"error":"invalid_request","error_description":"Redirect URI mismatch.","log_id":"L1"}"#;
        let e = parse_token_answer(&raw(400, body), now(), "x", &[]).unwrap_err();
        assert!(matches!(e, ProviderError::Misconfigured { .. }), "{e:?}");
        let ProviderError::Permanent { reason } = err(400, "invalid_grant") else { panic!() };
        assert!(reason.contains("invalid_grant") && reason.contains("L1"), "{reason}");
    }

    #[test]
    fn html_and_garbage_bodies_are_classified_by_status() {
        let html = "<html><body>Bad Gateway</body></html>";
        assert!(matches!(
            parse_token_answer(&raw(502, html), now(), "x", &[]).unwrap_err(),
            ProviderError::Transient { .. }
        ));
        assert!(matches!(
            parse_token_answer(&raw(200, html), now(), "x", &[]).unwrap_err(),
            ProviderError::Rejected { .. }
        ));
        let mut r = raw(429, "slow down");
        r.retry_after = Some(Duration::from_secs(30));
        let ProviderError::Transient { retry_after, .. } =
            parse_token_answer(&r, now(), "x", &[]).unwrap_err()
        else {
            panic!()
        };
        assert_eq!(retry_after, Some(Duration::from_secs(30)));
        assert!(matches!(
            parse_token_answer(&raw(200, "{}"), now(), "x", &[]).unwrap_err(),
            ProviderError::Rejected { .. }
        ));
    }

    #[test]
    fn reasons_never_echo_secrets() {
        let body = r#"{"error":"invalid_grant","error_description":"code C0DE*!xyz is bad for s3cr3t-value","log_id":"l"}"#;
        let e = parse_token_answer(&raw(400, body), now(), "x", &["C0DE*!xyz", "s3cr3t-value"]).unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("C0DE*!xyz") && !text.contains("s3cr3t-value"), "{text}");
    }

    #[test]
    fn user_info_envelope_and_flat_errors() {
        let ok = r#"{"data":{"user":{"open_id":"oid","union_id":"u","avatar_url":"https://a/x.png",
            "display_name":"Name","username":"handle"}},"error":{"code":"ok","message":"","log_id":"l"}}"#;
        let p = parse_user_info(&raw(200, ok), "x", &[]).unwrap();
        assert_eq!(p.account_id, "oid");
        assert_eq!(p.username.as_deref(), Some("handle"));
        assert_eq!(p.display_name.as_deref(), Some("Name"));
        assert_eq!(p.avatar_url.as_deref(), Some("https://a/x.png"));

        let enveloped = r#"{"data":{},"error":{"code":"access_token_invalid","message":"m","log_id":"l"}}"#;
        assert!(matches!(
            parse_user_info(&raw(401, enveloped), "x", &[]),
            Err(ProviderError::AccessTokenInvalid { .. })
        ));
        let flat = r#"{"code":"access_token_invalid","message":"m","log_id":"l"}"#;
        assert!(matches!(
            parse_user_info(&raw(401, flat), "x", &[]),
            Err(ProviderError::AccessTokenInvalid { .. })
        ));
        let scope = r#"{"error":{"code":"scope_not_authorized","message":"m","log_id":"l"}}"#;
        assert!(matches!(parse_user_info(&raw(401, scope), "x", &[]), Err(ProviderError::Scope { .. })));
        let missed = r#"{"error":{"code":"scope_permission_missed","message":"m","log_id":"l"}}"#;
        assert!(matches!(parse_user_info(&raw(400, missed), "x", &[]), Err(ProviderError::Scope { .. })));
        let rl = r#"{"data":{},"error":{"code":"rate_limit_exceeded","message":"m","log_id":"l"}}"#;
        assert!(matches!(parse_user_info(&raw(429, rl), "x", &[]), Err(ProviderError::Transient { .. })));
        let ie = r#"{"error":{"code":"internal_error","message":"m","log_id":"l"}}"#;
        assert!(matches!(parse_user_info(&raw(500, ie), "x", &[]), Err(ProviderError::Transient { .. })));
        let bad = r#"{"error":{"code":"invalid_params","message":"m","log_id":"l"}}"#;
        assert!(matches!(parse_user_info(&raw(400, bad), "x", &[]), Err(ProviderError::Rejected { .. })));
        assert!(matches!(
            parse_user_info(&raw(500, "<html>"), "x", &[]),
            Err(ProviderError::Transient { .. })
        ));
        assert!(matches!(
            parse_user_info(&raw(200, "<html>"), "x", &[]),
            Err(ProviderError::Rejected { .. })
        ));
    }

    #[test]
    fn revoke_answers() {
        assert!(parse_revoke_answer(&raw(200, ""), "x", &[]).is_ok());
        assert!(parse_revoke_answer(&raw(200, "{}"), "x", &[]).is_ok());
        let e = r#"{"error":"invalid_client","error_description":"d","log_id":"l"}"#;
        assert!(matches!(
            parse_revoke_answer(&raw(401, e), "x", &[]),
            Err(ProviderError::Misconfigured { .. })
        ));
        assert!(matches!(parse_revoke_answer(&raw(503, ""), "x", &[]), Err(ProviderError::Transient { .. })));
    }

    #[test]
    fn helpers() {
        assert_eq!(id_string(&serde_json::json!(27_640_875_392_278_831u64)).unwrap(), "27640875392278831");
        assert_eq!(scope_list(&serde_json::json!("a, b c,,a")), vec!["a", "b", "c"]);
        assert_eq!(scope_list(&serde_json::json!(["a", "b"])), vec!["a", "b"]);
        assert_eq!(public_url(&config(), "/x/").as_str(), "https://links.example.com/base/x/");
        let long = "x".repeat(400);
        let cut = sanitize(&long, &[]);
        assert_eq!(cut.chars().count(), 301);
        assert!(cut.ends_with('…'));
        assert_eq!(sanitize("a\nb", &[]), "ab");
        // A secret echoed as it is or percent-encoded is removed.
        let code = "abc*DEF!ghi 1";
        for echoed in [code, "abc%2ADEF%21ghi+1", "abc%2ADEF%21ghi%201"] {
            let out = sanitize(&format!("bad code {echoed}."), &[code]);
            assert_eq!(out, "bad code [redacted].", "{echoed}");
        }
    }

    /// What a provider might echo around a secret, in every shape it answers with: its JSON
    /// error envelopes, a plain text or HTML page, a form-encoded answer.
    fn echo_bodies(text: &str) -> Vec<String> {
        let form: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("error", "invalid_request")
            .append_pair("error_description", text)
            .finish();
        vec![
            serde_json::json!({"error": "invalid_grant", "error_description": text, "log_id": "L"}).to_string(),
            serde_json::json!({"data": {}, "error": {"code": "access_token_invalid", "message": text, "log_id": "L"}})
                .to_string(),
            serde_json::json!({"data": {"error_code": 10007, "description": text}, "message": "error"}).to_string(),
            text.to_string(),
            format!("<html><body><h1>Error</h1><p>{text}</p></body></html>"),
            form,
        ]
    }

    proptest::proptest! {
        /// Whatever a provider answers, whatever status, and wherever it echoes a secret we sent
        /// (plainly, percent-encoded, or with control characters in it), the error's reason,
        /// which is logged and stored, never holds the secret.
        #[test]
        fn no_answer_puts_a_secret_in_a_reason(
            secret in "[A-Za-z0-9*!._~+/=-]{12,48}",
            before in "\\PC{0,30}",
            after in "\\PC{0,30}",
            split in 0usize..12,
            encode in proptest::bool::ANY,
            status in proptest::sample::select(vec![200u16, 400, 401, 403, 429, 500, 502, 503]),
        ) {
            let mut echoed = secret.clone();
            if split > 0 {
                // A control character inside the echo, which the reason drops.
                echoed.insert(split, '\u{1}');
            }
            if encode {
                echoed = url::form_urlencoded::byte_serialize(echoed.as_bytes()).collect();
            }
            for body in echo_bodies(&format!("{before}{echoed}{after}")) {
                let answer = raw(status, &body);
                let errors = [
                    parse_token_answer(&answer, now(), "token exchange", &[&secret]).err(),
                    parse_user_info(&answer, "user info", &[&secret]).err(),
                    parse_revoke_answer(&answer, "revoke", &[&secret]).err(),
                ];
                for e in errors.into_iter().flatten() {
                    proptest::prop_assert!(!e.reason().contains(&secret), "{body} -> {e:?}");
                    proptest::prop_assert!(!e.to_string().contains(&secret), "{body} -> {e}");
                }
            }
        }

        /// An answer that is not a success status never parses as a token set or a profile.
        #[test]
        fn error_statuses_never_succeed(
            status in proptest::sample::select(vec![400u16, 401, 403, 404, 429, 500, 502, 503]),
            body in proptest::sample::select(vec![
                r#"{"access_token":"act.a","expires_in":86400,"open_id":"o","scope":"user.info.basic"}"#,
                r#"{"data":{"user":{"open_id":"o","display_name":"d"}},"error":{"code":"ok","message":"","log_id":"L"}}"#,
                "", "null", "{}", "<html>bad gateway</html>",
            ]),
        ) {
            let answer = raw(status, body);
            proptest::prop_assert!(parse_token_answer(&answer, now(), "x", &[]).is_err());
            proptest::prop_assert!(parse_user_info(&answer, "x", &[]).is_err());
        }
    }
}
