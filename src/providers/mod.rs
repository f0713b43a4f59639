//! OAuth provider adapters: TikTok (Login Kit for Web, v2) and Instagram (Instagram API with
//! Instagram Login), following the wire contracts exactly.
//!
//! An adapter knows URLs, parameter names, encodings and response shapes; it knows nothing about
//! links, workspaces or storage. In sandbox mode the very same adapter is pointed at the built-in
//! simulator (`/sandbox/{provider}/...`) instead of the real endpoints.
//!
//! Dispatch is an enum rather than a trait object: the set of providers is closed and known at
//! compile time, and async methods on an enum need no boxing.

#[cfg(fuzzing)]
pub mod fuzzing;
pub mod instagram;
pub mod pkce;
pub mod tiktok;

use std::time::Duration;

use secrecy::SecretString;
use time::OffsetDateTime;
use url::Url;

use crate::config::Config;
use crate::domain::Platform;

/// Tokens returned by a code exchange or a refresh.
#[derive(Debug, Clone)]
pub struct TokenSet {
    /// The access token.
    pub access_token: SecretString,
    /// When the access token expires (from `expires_in`).
    pub access_expires_at: OffsetDateTime,
    /// The refresh token, when the provider issues one (TikTok does; Instagram does not).
    pub refresh_token: Option<SecretString>,
    /// When the refresh token expires (from `refresh_expires_in`).
    pub refresh_expires_at: Option<OffsetDateTime>,
    /// The scopes actually granted, as reported by the provider.
    pub scopes: Vec<String>,
    /// The account id reported by the token endpoint (`open_id` / `user_id`), if any.
    pub account_id: Option<String>,
}

/// The connected account's public profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// The stable account id the connection is keyed on (TikTok `open_id`; Instagram `/me`
    /// `user_id`).
    pub account_id: String,
    /// The handle, without `@`.
    pub username: Option<String>,
    /// The display name.
    pub display_name: Option<String>,
    /// An avatar URL on the provider's CDN.
    pub avatar_url: Option<String>,
    /// Instagram's app-scoped id (`/me` `id`), used by deauthorization callbacks.
    pub app_scoped_id: Option<String>,
    /// Scopes the provider said the token lacks while the profile was read: TikTok refused the
    /// fields of `user.info.profile` (`scope_not_authorized`), and the basic ones were read
    /// instead.
    pub withheld_scopes: Vec<String>,
}

/// How a provider call failed, classified for the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The grant is dead (invalid_grant, revoked app, expired token, Graph 190): the client must
    /// connect again. The reason is for people.
    #[error("permanent provider failure: {reason}")]
    Permanent {
        /// A readable reason, without secrets.
        reason: String,
    },
    /// The access token was refused (TikTok `access_token_invalid`) while the grant may live on:
    /// a refresh may cure it, and only a refusal after a refresh is permanent (providers.md
    /// §9.3).
    #[error("access token refused: {reason}")]
    AccessTokenInvalid {
        /// A readable reason, without secrets.
        reason: String,
    },
    /// Worth retrying later: timeouts, 5xx, 429, `server_error`, `temporarily_unavailable`,
    /// Graph `is_transient`, network errors.
    #[error("transient provider failure: {reason}")]
    Transient {
        /// A readable reason, without secrets.
        reason: String,
        /// The provider's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// A scope is missing (`scope_not_authorized`, Graph 10/200): needs re-consent.
    #[error("scope missing: {reason}")]
    Scope {
        /// A readable reason.
        reason: String,
    },
    /// The request itself was refused (bad client credentials, redirect_uri mismatch, PKCE
    /// mismatch, malformed answer): a configuration problem or a bug, not the client's fault.
    #[error("provider refused the request: {reason}")]
    Rejected {
        /// A readable reason, without secrets.
        reason: String,
    },
    /// The provider refused authlink's own credentials or callback URL (`invalid_client`,
    /// `unauthorized_client`, a redirect URI it does not know): every request fails alike until
    /// the operator fixes the provider's settings.
    #[error("provider refused the client's settings: {reason}")]
    Misconfigured {
        /// A readable reason, without secrets.
        reason: String,
    },
}

impl ProviderError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ProviderError::Transient { .. })
    }

    /// The readable reason, without secrets.
    pub fn reason(&self) -> &str {
        match self {
            ProviderError::Permanent { reason }
            | ProviderError::AccessTokenInvalid { reason }
            | ProviderError::Transient { reason, .. }
            | ProviderError::Scope { reason }
            | ProviderError::Rejected { reason }
            | ProviderError::Misconfigured { reason } => reason,
        }
    }
}

/// The parameters of one authorization request.
#[derive(Clone)]
pub struct AuthorizeRequest<'a> {
    /// The OAuth `state`.
    pub state: &'a str,
    /// The PKCE code verifier (the adapter derives the challenge in the provider's encoding);
    /// empty for a provider without PKCE ([`Provider::uses_pkce`]).
    pub code_verifier: &'a str,
    /// The exact callback URI registered with the provider.
    pub redirect_uri: &'a str,
}
redacted_debug!(AuthorizeRequest<'a>, shown: [redirect_uri], hidden: [state, code_verifier]);

/// One configured provider.
#[derive(Debug, Clone)]
pub enum Provider {
    /// TikTok.
    Tiktok(tiktok::TikTok),
    /// Instagram.
    Instagram(instagram::Instagram),
}

impl Provider {
    /// Which platform this is.
    pub fn platform(&self) -> Platform {
        match self {
            Provider::Tiktok(_) => Platform::Tiktok,
            Provider::Instagram(_) => Platform::Instagram,
        }
    }

    /// Whether the provider's flow takes a PKCE verifier: TikTok's does; Instagram Login has no
    /// PKCE (providers.md §1), so no verifier is made or kept for its attempts.
    pub fn uses_pkce(&self) -> bool {
        match self {
            Provider::Tiktok(_) => true,
            Provider::Instagram(_) => false,
        }
    }

    /// Whether the provider offers revocation of a grant: TikTok does (§2.6), with the access
    /// token; Instagram Login does not.
    pub fn offers_revocation(&self) -> bool {
        match self {
            Provider::Tiktok(_) => true,
            Provider::Instagram(_) => false,
        }
    }

    /// Whether this adapter points at the built-in sandbox.
    pub fn is_sandbox(&self) -> bool {
        match self {
            Provider::Tiktok(p) => p.sandbox,
            Provider::Instagram(p) => p.sandbox,
        }
    }

    /// The youngest a token may be for the provider to refresh it: Instagram refreshes a
    /// long-lived token only once it is 24 hours old (§3.5); TikTok refreshes at any age.
    pub fn min_refresh_age(&self) -> Option<time::Duration> {
        match self {
            Provider::Tiktok(_) => None,
            Provider::Instagram(_) => Some(instagram::MIN_REFRESH_AGE),
        }
    }

    /// The scopes this provider asks for.
    pub fn scopes(&self) -> &[String] {
        match self {
            Provider::Tiktok(p) => &p.scopes,
            Provider::Instagram(p) => &p.scopes,
        }
    }

    /// The URL to send the browser to.
    pub fn authorize_url(&self, req: &AuthorizeRequest<'_>) -> Url {
        match self {
            Provider::Tiktok(p) => p.authorize_url(req),
            Provider::Instagram(p) => p.authorize_url(req),
        }
    }

    /// Exchanges an authorization code for tokens (for Instagram, then swaps the short-lived
    /// token for a long-lived one).
    pub async fn exchange_code(
        &self,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
        now: OffsetDateTime,
    ) -> Result<TokenSet, ProviderError> {
        match self {
            Provider::Tiktok(p) => p.exchange_code(code, code_verifier, redirect_uri, now).await,
            Provider::Instagram(p) => p.exchange_code(code, redirect_uri, now).await,
        }
    }

    /// Fetches the account's profile with an access token.
    pub async fn fetch_profile(&self, access_token: &SecretString) -> Result<Profile, ProviderError> {
        match self {
            Provider::Tiktok(p) => p.fetch_profile(access_token).await,
            Provider::Instagram(p) => p.fetch_profile(access_token).await,
        }
    }

    /// Fetches the account's profile and checks the grant with it (a health check): the profile,
    /// with `withheld_scopes` naming the scopes of `granted` the provider now refuses, where its
    /// profile call can tell (TikTok's `user.info.profile` and `user.info.stats`; Instagram's
    /// needs only the basic scope, so it names none).
    pub async fn check_profile(
        &self,
        access_token: &SecretString,
        granted: &[String],
    ) -> Result<Profile, ProviderError> {
        match self {
            Provider::Tiktok(p) => p.check_profile(access_token, granted).await,
            Provider::Instagram(p) => p.fetch_profile(access_token).await,
        }
    }

    /// Refreshes: TikTok with the refresh token (which rotates), Instagram by refreshing the
    /// long-lived access token itself.
    pub async fn refresh(
        &self,
        access_token: &SecretString,
        refresh_token: Option<&SecretString>,
        now: OffsetDateTime,
    ) -> Result<TokenSet, ProviderError> {
        match self {
            Provider::Tiktok(p) => match refresh_token {
                Some(rt) => p.refresh(rt, now).await,
                None => Err(ProviderError::Permanent { reason: "no refresh token is stored".into() }),
            },
            Provider::Instagram(p) => p.refresh(access_token, now).await,
        }
    }

    /// Revokes the grant at the provider, where the provider offers revocation. Returns whether
    /// a revocation call was made.
    pub async fn revoke(&self, access_token: &SecretString) -> Result<bool, ProviderError> {
        match self {
            Provider::Tiktok(p) => p.revoke(access_token).await.map(|()| true),
            // Instagram Login offers no revocation endpoint.
            Provider::Instagram(_) => Ok(false),
        }
    }
}

/// The configured providers.
#[derive(Debug, Clone)]
pub struct Providers {
    tiktok: Option<Provider>,
    instagram: Option<Provider>,
    /// The connections whose tokens these may be given, comma-separated (see [`Self::served`]).
    served: String,
}

impl Providers {
    /// Builds the adapters from the configuration. Providers in sandbox mode point at
    /// `{public_url}/sandbox/{provider}/...` with the sandbox's fixed test credentials.
    pub fn from_config(config: &Config, http: reqwest::Client) -> Self {
        let tiktok = config
            .providers
            .tiktok
            .enabled
            .then(|| Provider::Tiktok(tiktok::TikTok::from_config(config, http.clone())));
        let instagram = config
            .providers
            .instagram
            .enabled
            .then(|| Provider::Instagram(instagram::Instagram::from_config(config, http)));
        let mut providers = Self { tiktok, instagram, served: String::new() };
        providers.served = Platform::ALL
            .into_iter()
            .filter_map(|p| providers.get(p).map(|provider| served_name(p, provider.is_sandbox())))
            .collect::<Vec<_>>()
            .join(",");
        providers
    }

    /// The adapter of `platform`, if enabled.
    pub fn get(&self, platform: Platform) -> Option<&Provider> {
        match platform {
            Platform::Tiktok => self.tiktok.as_ref(),
            Platform::Instagram => self.instagram.as_ref(),
        }
    }

    /// The connections whose tokens this process may send to a provider, for SQL that filters
    /// on them: comma-separated, one [`served_name`] per enabled provider. A connection made
    /// with the sandbox is served only where its provider is simulated, and one made with the
    /// real provider only where it is not: a real connection's tokens never go to the sandbox
    /// (which would refuse them, and its connection be found broken), nor a sandbox
    /// connection's to the real provider with the real client secret.
    pub fn served(&self) -> &str {
        &self.served
    }

    /// The adapter that may be given the tokens of a connection of `platform` made with the
    /// sandbox or not (`sandbox`): `Err` when the provider is not enabled here
    /// ([`Mode::Off`]), or enabled in the other mode.
    pub fn serving(&self, platform: Platform, sandbox: bool) -> Result<&Provider, Mode> {
        match self.get(platform) {
            None => Err(Mode::Off),
            Some(p) if p.is_sandbox() == sandbox => Ok(p),
            Some(p) if p.is_sandbox() => Err(Mode::Simulated),
            Some(_) => Err(Mode::Real),
        }
    }
}

/// How a provider runs on this instance, when it cannot serve a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not enabled.
    Off,
    /// Simulated by the sandbox (the connection was made with the real provider).
    Simulated,
    /// The real provider (the connection was made with the sandbox).
    Real,
}

impl Mode {
    /// Why a connection of `platform` is not sent to its provider here, in words.
    pub fn explain(self, platform: Platform) -> String {
        let name = platform.display_name();
        match self {
            Mode::Off => format!("{name} is not enabled on this instance"),
            Mode::Simulated => format!(
                "the connection was made with the real {name}, which this instance simulates (no credentials \
                 configured, or providers.{}.sandbox = true): its tokens are not sent to the sandbox",
                platform.as_str()
            ),
            Mode::Real => format!(
                "the connection was made with the {name} sandbox, and this instance uses the real {name}: \
                 its tokens are not sent there"
            ),
        }
    }
}

/// How a connection of `platform` made with the sandbox or not is named in [`Providers::served`]:
/// `tiktok`, or `tiktok:sandbox` (the SQL that filters on them builds the same from the row).
pub fn served_name(platform: Platform, sandbox: bool) -> String {
    if sandbox { format!("{}:sandbox", platform.as_str()) } else { platform.as_str().to_owned() }
}

/// The HTTP client for provider calls: rustls, a timeout, no redirects followed (a redirect from
/// a token endpoint is an error, not something to chase).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    #[allow(clippy::expect_used)] // only fails if the TLS backend cannot initialise at all
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("authlink/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client")
}
