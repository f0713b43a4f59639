//! The built-in provider simulator: a second, independent implementation of the TikTok and
//! Instagram wire contracts of providers.md §2 and §3, served under `/sandbox`.
//!
//! The adapters in [`crate::providers`] talk to it over HTTP exactly as they talk to the real
//! providers; nothing in the adapters knows it is a simulation. Its state (codes, tokens, scenario
//! switches, call counters) lives in memory and every lifetime is measured with the shared clock,
//! so moving the clock forward (`POST /sandbox/control/clock/advance`) expires codes and tokens.
//! The sandbox never logs code or token values.
//!
//! # Routes (relative to `/sandbox`)
//!
//! TikTok ([`tiktok`]), credentials [`TIKTOK_CLIENT_KEY`] / [`TIKTOK_CLIENT_SECRET`], registered
//! redirect URI `{public_url}/oauth/tiktok/callback`:
//! - `GET  /tiktok/v2/auth/authorize/`: validates the request; a bad `client_key`,
//!   `redirect_uri`, `response_type`, `scope`, `code_challenge` (64 lowercase hex chars required
//!   unless `pkce_optional`) or `code_challenge_method` gets an HTML error page naming the
//!   parameter (no redirect); otherwise the consent page.
//! - `POST /tiktok/v2/auth/authorize/`: the consent form (see below).
//! - `POST /tiktok/v2/oauth/token/`: `authorization_code` and `refresh_token` grants (rotating).
//! - `GET  /tiktok/v2/user/info/?fields=...`: the user-info envelope.
//! - `POST /tiktok/v2/oauth/revoke/`: kills both tokens of the grant.
//!
//! Instagram ([`instagram`]), credentials [`INSTAGRAM_CLIENT_ID`] / [`INSTAGRAM_CLIENT_SECRET`],
//! registered redirect URI `{public_url}/oauth/instagram/callback`:
//! - `GET  /instagram/oauth/authorize`, `POST /instagram/oauth/authorize` (consent form).
//! - `POST /instagram/oauth/access_token` (urlencoded or multipart): short-lived token (1 h).
//! - `GET  /instagram/graph/access_token?grant_type=ig_exchange_token&client_secret&access_token`.
//! - `GET  /instagram/graph/refresh_access_token?grant_type=ig_refresh_token&access_token`.
//! - `GET  /instagram/graph/{version}/me?fields=...` (token as `access_token=` or Bearer).
//!
//! `GET /avatars/{name}.svg` serves the fake accounts' avatars, so nothing external is loaded.
//!
//! # The consent form (stable, for tests that drive it without a browser)
//!
//! The consent page is a plain HTML form (no JavaScript) that POSTs
//! `application/x-www-form-urlencoded` to the same path as the authorize GET:
//! `{public_url}/sandbox/tiktok/v2/auth/authorize/` or `{public_url}/sandbox/instagram/oauth/authorize`.
//! Its fields:
//! - the authorize request's own query parameters, unchanged, as hidden fields (TikTok:
//!   `client_key`, `scope`, `redirect_uri`, `state`, `response_type`, `code_challenge`,
//!   `code_challenge_method`; Instagram: `client_id`, `redirect_uri`, `response_type`, `scope`,
//!   `state`). A test can therefore POST the authorize URL's query pairs verbatim. They are
//!   validated again on POST.
//! - `account`: the chosen fake account: a TikTok `open_id` or an Instagram `user_id` (see
//!   [`TIKTOK_ACCOUNTS`], [`INSTAGRAM_ACCOUNTS`]). Optional; defaults to the first account.
//! - `granted`: repeated, one scope per field, the scopes the user leaves ticked. Only requested
//!   scopes count, and the required one (`user.info.basic` / `instagram_business_basic`) is always
//!   granted (the page sends it as a hidden field beside its disabled checkbox). When the form
//!   carries no `granted` field at all, every requested scope is granted.
//! - `decision`: `allow` or `deny` (required). With the `deny_all` switch, `allow` acts as `deny`.
//!
//! The answer is a `302` to the redirect URI: TikTok `?code=...&scopes=<granted,comma,list>&state=...`
//! (codes contain `*` and `!`, percent-encoded) or `?error=access_denied&error_description=...&state=...`;
//! Instagram `?code=...&state=...#_` or
//! `?error=access_denied&error_reason=user_denied&error_description=...&state=...`.
//!
//! # Control API (only when `sandbox.control_api` is true)
//!
//! `{provider}` is `tiktok` or `instagram`. Every body is JSON, and every `POST` is sent with
//! `Content-Type: application/json` (even one without a body), else `415`: another site's page
//! cannot make a browser send that without a CORS preflight, which is never answered. Errors are
//! `400 {"error": "..."}` (unknown provider: 404).
//! - `POST /control/{provider}/scenario` with a partial object of switches; only the keys sent
//!   change, `fail_next` replaces the queue. Answers the resulting scenario; a switch or a
//!   failure that cannot happen at that provider or endpoint is refused (400). See
//!   [`ScenarioPatch`]:
//!   `{"deny_all": bool, "fail_next": [{"endpoint": "authorize"|"token"|"refresh"|"profile"|"exchange_long_lived"|"revoke",
//!   "kind": "invalid_grant"|"bad_code"|"server_error"|"rate_limit"|"slow"|"hold"|"slow_answer"|"html_error"|"access_token_invalid"|"scope_not_authorized"|"graph_rate_limit"|"temporarily_unavailable"|"scope_permission_missed"|"invalid_client"|"redirect_uri_mismatch"|"pkce_mismatch"|"request_error"|"callback_error",
//!   "count": n (default 1), "status": optional HTTP status for html_error (default 502) and
//!   Instagram's graph_rate_limit (400, 403 or 429; default 400) and server_error (400, 500 or
//!   503; default 500), "code": Instagram's graph_rate_limit Graph code (4, 17, 32 or 613;
//!   default 4) or server_error Graph code (1, "An unknown error occurred", or 2 with
//!   `is_transient`; default 2), "parameter": the authorize
//!   parameter request_error refuses (default redirect_uri), "error": the `error` a TikTok
//!   callback_error redirects with (default server_error)}],
//!   "pkce_optional": bool (TikTok), "rate_limit_per_min": n (TikTok's user info, a
//!   one-minute sliding window, default 600, 0 for none), "lifetimes": "long"|"short" (TikTok), "oauth_error_status":
//!   "http"|"ok" (TikTok: OAuth errors on their own status, or on a 200), "api_error_shape":
//!   "nested"|"nested_no_data"|"flat" (TikTok: user-info errors as `{data: {}, error: {..}}`,
//!   as `{error: {..}}`, or as the flat `{code, message, log_id}` the docs print), "token_shape":
//!   "flat"|"wrapped" (Instagram), "me_shape": "flat"|"wrapped" (Instagram: `/me` as it is, or in
//!   `{data: [..]}`), "signing_secret": "instagram"|"meta" (Instagram: which app secret signs
//!   Meta's callbacks, [`INSTAGRAM_CLIENT_SECRET`] or [`META_APP_SECRET`]), "refresh_too_early":
//!   "code_100"|"code_190" (Instagram, default code_100), "refresh_min_age_secs": n (Instagram,
//!   default 86400), "error_state": "echo"|"omit" (whether `state` comes back with an error
//!   redirect), "refresh_rotation": "rotate"|"keep"|"omit" (TikTok: a new refresh token with
//!   every refresh, the one sent dying at once; the same one back, still valid; or none in the
//!   answer, the one sent still valid), "exchange_user_id": "professional"|"app_scoped"
//!   (Instagram: the code exchange's `user_id` is `/me` `user_id`, or `/me` `id`),
//!   "personal_account": "allow"|"refuse_login" (Instagram: a personal account's login goes
//!   through, `/me` then saying `PERSONAL`, or is refused on the consent page, with no redirect),
//!   "retry_after_secs": n (default 30), "slow_ms": n (default 15000)}`.
//!   `fail_next` entries are consumed in order, per endpoint: a call takes the first entry for its
//!   endpoint. `slow` waits `slow_ms`, then answers normally; `hold` waits until released (below)
//!   or for `slow_ms` at most, then answers normally; `slow_answer` (TikTok's `token` and
//!   `refresh`) answers normally, but `slow_ms` after handling the call. See [`FailureKind`] for each kind's
//!   answer per provider; on Instagram's code exchange (`token`) every kind answers the
//!   exchange's own `{error_type, code, error_message}` shape (§3.3), never the Graph one. The
//!   request faults (`invalid_client`, `redirect_uri_mismatch`, `pkce_mismatch`,
//!   `request_error`) do not answer for the endpoint: they put a wrong value into the request
//!   and let the endpoint's own checks answer, so that codes are spent as they really are.
//! - `GET  /control/{provider}/scenario`: the current switches.
//! - `POST /control/{provider}/release`: every call a `hold` failure keeps waiting goes on.
//!   Answers `{"released": n}`.
//! - `POST /control/{provider}/reset`: switches and counters back to their defaults (codes and
//!   tokens stay). Answers `{"ok": true}`.
//! - `GET  /control/{provider}/stats`: see [`Stats`]: `{"authorize_requests", "token_calls",
//!   "refresh_calls", "profile_calls", "revoke_calls", "exchange_long_lived_calls",
//!   "invalid_grant", "refresh_token_reuse", "challenges": [..], "held"}` (`held`: calls a `hold`
//!   failure keeps waiting now).
//! - `GET  /control/{provider}/accounts`: the fake accounts.
//! - `POST /control/{provider}/accounts/{account_id}/revoke`, optional body
//!   `{"reason": "app_removed"|"password_changed", "notify": bool}`: kills every token of the
//!   account (Instagram then answers Graph 190 with subcode 458 or 460). For Instagram with
//!   `app_removed`, the sandbox then sends Meta's signed deauthorize callback to authlink, as Meta
//!   does (`"notify": false`: a callback that never arrived). Answers
//!   `{"revoked_tokens": n, "deauthorize_callback": <authlink's status, or null>}`.
//! - `POST /control/instagram/accounts/{user_id}/data-deletion`: sends Meta's signed
//!   data-deletion request for the account to authlink and checks the answer as Meta does.
//!   Answers `{"status": n, "url", "confirmation_code", "status_page": n|null, "valid": bool}`
//!   (`valid`: a 2xx with both fields, and the status page answering 2xx); 404 for an unknown
//!   account.
//! - `POST /control/instagram/accounts/{user_id}/account-type` `{"account_type":
//!   "BUSINESS"|"MEDIA_CREATOR"|"PERSONAL"}`: switches the account's type, as its owner does in
//!   the Instagram app; its tokens live on, and `/me` and the consent page show the new type
//!   (a reset keeps it, as it keeps codes and tokens). Answers `{"account_type": ..}`; 404 for an
//!   unknown account.
//! - `POST /control/tiktok/accounts/{open_id}/revoke-access-tokens`: kills the account's live
//!   access tokens only; its refresh token still works (an access token revoked mid-life).
//!   Answers `{"revoked_tokens": n}`.
//! - `POST /control/tiktok/accounts/{open_id}/withdraw-scopes` `{"scopes": [..]}`: takes those
//!   scopes away from the account's live grants, as a user unticking permissions in the app's
//!   settings does; tokens live on, the next refresh reports the smaller `scope`, and user-info
//!   fields that needed them answer `scope_not_authorized`. `user.info.basic` cannot be
//!   withdrawn (400). Answers `{"grants": n}` (how many changed); 404 for an unknown account.
//! - `POST /control/tiktok/grants` `{"count": n, "scopes": [..]}` (1 ≤ n ≤ 20,000): grants for
//!   synthetic accounts `sbx-oid-bulk-<k>`, as if n users had authorised the app, for load and
//!   concurrency tests; their profile calls answer with a synthetic profile (`sandbox.bulk.<k>`).
//!   Answers `{"grants": [{open_id, access_token, refresh_token, expires_in, refresh_expires_in,
//!   scope}]}`.
//! - `GET  /control/tiktok/live-refresh-tokens`: `{"sha256": [..]}` of every refresh token that
//!   still works.
//! - `POST /control/clock/advance` `{"seconds": n}` (n ≥ 0): moves the shared clock. Answers
//!   `{"now": "<RFC 3339>", "now_unix": n}`.

mod control;
pub mod instagram;
mod pages;
pub mod tiktok;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::domain::Platform;

pub use instagram::{INSTAGRAM_ACCOUNTS, InstagramAccount};
pub use tiktok::{TIKTOK_ACCOUNTS, TikTokAccount};

/// The sandbox's TikTok client key.
pub const TIKTOK_CLIENT_KEY: &str = "sandbox-tiktok-client-key";
/// The sandbox's TikTok client secret.
pub const TIKTOK_CLIENT_SECRET: &str = "sandbox-tiktok-client-secret";
/// The sandbox's Instagram app id.
pub const INSTAGRAM_CLIENT_ID: &str = "sandbox-instagram-client-id";
/// The sandbox's Instagram app secret.
pub const INSTAGRAM_CLIENT_SECRET: &str = "sandbox-instagram-client-secret";
/// The sandbox's Meta app secret: the other secret that may sign Meta's callbacks for an
/// Instagram-Login app (see [`SigningSecret`]).
pub const META_APP_SECRET: &str = "sandbox-meta-app-secret";

/// Most `challenges` kept in the stats (the newest win).
const MAX_CHALLENGES: usize = 1000;
/// Most live codes per provider; the sandbox is reachable by anyone when a provider runs in
/// sandbox mode, so its memory is bounded.
const MAX_CODES: usize = 10_000;
/// Most tokens kept per provider.
const MAX_TOKENS: usize = 500_000;

/// The built-in provider simulator.
///
/// `Debug` is written by hand: the state holds live codes and tokens, which must never reach a
/// log line through a `{:?}` of the application state.
pub struct Sandbox {
    clock: Arc<SystemClock>,
    control_api: bool,
    /// `{public_url}` without a trailing slash.
    public_base: String,
    tiktok_redirect_uri: String,
    instagram_redirect_uri: String,
    tiktok: Mutex<tiktok::TikTokState>,
    instagram: Mutex<instagram::InstagramState>,
    /// The calls `hold` failures keep waiting, per provider (TikTok, Instagram).
    holds: [Hold; 2],
}

/// The calls of one provider that `hold` failures keep waiting, and their release.
#[derive(Debug)]
struct Hold {
    /// How many calls wait now.
    waiting: std::sync::atomic::AtomicU64,
    /// Bumped by each release; a waiting call ends when it changes.
    release: tokio::sync::watch::Sender<u64>,
}

impl Default for Hold {
    fn default() -> Self {
        Self { waiting: std::sync::atomic::AtomicU64::new(0), release: tokio::sync::watch::Sender::new(0) }
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("control_api", &self.control_api)
            .field("public_base", &self.public_base)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// A sandbox with empty state. `clock` is the service's shared clock: the sandbox reads it for
    /// every lifetime and the control API advances it.
    pub fn new(config: &Config, clock: Arc<SystemClock>) -> Self {
        Self {
            clock,
            control_api: config.sandbox.control_api,
            public_base: config.public(""),
            tiktok_redirect_uri: config.public("/oauth/tiktok/callback"),
            instagram_redirect_uri: config.public("/oauth/instagram/callback"),
            tiktok: Mutex::new(tiktok::TikTokState::default()),
            instagram: Mutex::new(instagram::InstagramState::default()),
            holds: Default::default(),
        }
    }

    fn hold_of(&self, platform: Platform) -> &Hold {
        match platform {
            Platform::Tiktok => &self.holds[0],
            Platform::Instagram => &self.holds[1],
        }
    }

    /// A `hold` failure: waits until the control API releases the calls of `platform`, or for
    /// `limit` at most.
    pub(crate) async fn hold(&self, platform: Platform, limit: std::time::Duration) {
        use std::sync::atomic::{AtomicU64, Ordering};
        /// Counts a waiting call until it ends, also when its caller goes away mid-wait (the
        /// handler's future is then dropped).
        struct Waiting<'a>(&'a AtomicU64);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let hold = self.hold_of(platform);
        let mut released = hold.release.subscribe();
        hold.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&hold.waiting);
        let _ = tokio::time::timeout(limit, released.changed()).await;
    }

    /// Ends the wait of every call of `platform` that a `hold` failure keeps; answers how many
    /// there were.
    pub fn release(&self, platform: Platform) -> u64 {
        let hold = self.hold_of(platform);
        let waiting = hold.waiting.load(std::sync::atomic::Ordering::SeqCst);
        hold.release.send_modify(|generation| *generation += 1);
        waiting
    }

    /// The sandbox's routes, with their state applied, to be mounted with
    /// `.nest("/sandbox", sandbox.router())`. The control routes exist only when
    /// `sandbox.control_api` is on.
    pub fn router(self: &Arc<Self>) -> Router {
        let mut router = Router::new()
            .route("/tiktok/v2/auth/authorize/", get(tiktok::authorize_page).post(tiktok::authorize_decision))
            .route("/tiktok/v2/oauth/token/", post(tiktok::token))
            .route("/tiktok/v2/user/info/", get(tiktok::user_info))
            .route("/tiktok/v2/oauth/revoke/", post(tiktok::revoke))
            .route(
                "/instagram/oauth/authorize",
                get(instagram::authorize_page).post(instagram::authorize_decision),
            )
            .route("/instagram/oauth/access_token", post(instagram::access_token))
            .route("/instagram/graph/access_token", get(instagram::exchange_long_lived))
            .route("/instagram/graph/refresh_access_token", get(instagram::refresh))
            .route("/instagram/graph/{version}/me", get(instagram::me))
            .route("/avatars/{name}", get(pages::avatar));
        if self.control_api {
            router = router.merge(control::routes());
        }
        router.with_state(Arc::clone(self))
    }

    /// Whether the control API is served.
    pub fn control_api_enabled(&self) -> bool {
        self.control_api
    }

    /// The call counters of `platform`.
    pub fn stats(&self, platform: Platform) -> Stats {
        let mut stats = match platform {
            Platform::Tiktok => self.tiktok_state().stats.clone(),
            Platform::Instagram => self.instagram_state().stats.clone(),
        };
        stats.held = self.hold_of(platform).waiting.load(std::sync::atomic::Ordering::SeqCst);
        stats
    }

    /// The scenario switches of `platform`.
    pub fn scenario(&self, platform: Platform) -> Scenario {
        match platform {
            Platform::Tiktok => self.tiktok_state().scenario.clone(),
            Platform::Instagram => self.instagram_state().scenario.clone(),
        }
    }

    /// Changes the switches present in `patch`; refuses switches that do not apply to `platform`.
    pub fn set_scenario(&self, platform: Platform, patch: ScenarioPatch) -> Result<Scenario, String> {
        for failure in patch.fail_next.iter().flatten() {
            failure.check(platform)?;
        }
        match platform {
            Platform::Tiktok => {
                if patch.token_shape.is_some()
                    || patch.refresh_too_early.is_some()
                    || patch.refresh_min_age_secs.is_some()
                    || patch.me_shape.is_some()
                    || patch.signing_secret.is_some()
                    || patch.exchange_user_id.is_some()
                    || patch.personal_account.is_some()
                {
                    return Err("token_shape, refresh_too_early, refresh_min_age_secs, me_shape, \
                                signing_secret, exchange_user_id and personal_account apply to instagram only"
                        .into());
                }
                let mut st = self.tiktok_state();
                st.scenario.apply(patch);
                Ok(st.scenario.clone())
            }
            Platform::Instagram => {
                if patch.pkce_optional.is_some()
                    || patch.lifetimes.is_some()
                    || patch.oauth_error_status.is_some()
                    || patch.rate_limit_per_min.is_some()
                    || patch.api_error_shape.is_some()
                    || patch.refresh_rotation.is_some()
                {
                    return Err("pkce_optional, lifetimes, oauth_error_status, rate_limit_per_min, \
                                api_error_shape and refresh_rotation apply to tiktok only"
                        .into());
                }
                let mut st = self.instagram_state();
                st.scenario.apply(patch);
                Ok(st.scenario.clone())
            }
        }
    }

    /// Puts the switches and counters of `platform` back to their defaults.
    pub fn reset(&self, platform: Platform) {
        self.release(platform);
        match platform {
            Platform::Tiktok => {
                let mut st = self.tiktok_state();
                st.scenario = Scenario::default();
                st.stats = Stats::default();
            }
            Platform::Instagram => {
                let mut st = self.instagram_state();
                st.scenario = Scenario::default();
                st.stats = Stats::default();
            }
        }
    }

    /// Kills every token of one fake account, as if the user removed the app (or, for Instagram
    /// with [`RevokeReason::PasswordChanged`], changed the password). Returns how many live
    /// tokens died.
    pub fn revoke_account(&self, platform: Platform, account_id: &str, reason: RevokeReason) -> usize {
        let now = self.now();
        match platform {
            Platform::Tiktok => self.tiktok_state().revoke_account(account_id, now),
            Platform::Instagram => self.instagram_state().revoke_account(account_id, reason, now),
        }
    }

    /// Sends Meta's deauthorize callback for the fake Instagram account `account_id` (its user id)
    /// to `{public_url}/oauth/instagram/deauthorize`, as Meta does when a user removes the app
    /// (§3.8, §3.10). Returns the answer's status, or `None` for an unknown account or an
    /// unreachable endpoint. See [`Sandbox::send_instagram_callback`].
    pub async fn send_instagram_deauthorize(&self, account_id: &str) -> Option<u16> {
        self.send_instagram_callback(account_id, MetaCallback::Deauthorize).await.map(|(status, _)| status)
    }

    /// Sends one of Meta's signed callbacks for the fake Instagram account `account_id` (its user
    /// id) to authlink (§3.8): a form with `signed_request`, HMAC-SHA256 with the secret the
    /// `signing_secret` switch names, over a payload naming the app-scoped id and the sandbox's
    /// time. Returns the answer's status and its JSON body (if it has one), or `None` for an
    /// unknown account or an unreachable endpoint.
    pub async fn send_instagram_callback(
        &self,
        account_id: &str,
        which: MetaCallback,
    ) -> Option<(u16, Option<serde_json::Value>)> {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use hmac::{Hmac, Mac};
        let user_id = account_id.parse::<u64>().ok()?;
        let account = INSTAGRAM_ACCOUNTS.iter().find(|a| a.user_id == user_id)?;
        let payload = URL_SAFE_NO_PAD.encode(
            serde_json::json!({
                "algorithm": "HMAC-SHA256",
                "issued_at": self.now().unix_timestamp(),
                "user_id": account.app_scoped_id,
            })
            .to_string(),
        );
        let secret = match self.instagram_state().scenario.signing_secret {
            SigningSecret::Instagram => INSTAGRAM_CLIENT_SECRET,
            SigningSecret::Meta => META_APP_SECRET,
        };
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).ok()?;
        mac.update(payload.as_bytes());
        let signed = format!("{}.{payload}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        let client =
            reqwest::Client::builder().no_proxy().timeout(std::time::Duration::from_secs(10)).build().ok()?;
        let path = match which {
            MetaCallback::Deauthorize => "/oauth/instagram/deauthorize",
            MetaCallback::DataDeletion => "/oauth/instagram/data-deletion",
        };
        let res = client
            .post(format!("{}{path}", self.public_base))
            .form(&[("signed_request", signed.as_str())])
            .send()
            .await;
        match res {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.json::<serde_json::Value>().await.ok();
                Some((status, body))
            }
            Err(e) => {
                // The URL is ours and holds no secret; the error says how it failed.
                tracing::warn!(
                    callback = ?which,
                    timeout = e.is_timeout(),
                    connect = e.is_connect(),
                    "sandbox callback to authlink failed"
                );
                None
            }
        }
    }

    /// The status of `GET {url}` when `url` is on authlink's own origin (Meta's data-deletion
    /// status page), `None` for any other URL or when it cannot be reached.
    pub async fn status_of_own_page(&self, url: &str) -> Option<u16> {
        let parsed = url::Url::parse(url).ok()?;
        let own = url::Url::parse(&self.public_base).ok()?;
        if parsed.origin() != own.origin() {
            return None;
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .ok()?;
        client.get(parsed).send().await.ok().map(|r| r.status().as_u16())
    }

    /// Kills the live TikTok access tokens of one fake account but not its refresh tokens, as
    /// when TikTok invalidates an access token mid-life: user info then answers
    /// `access_token_invalid`, and a refresh still issues a working pair. Returns how many died.
    pub fn revoke_tiktok_access_tokens(&self, open_id: &str) -> usize {
        let now = self.now();
        self.tiktok_state().revoke_access_tokens(open_id, now)
    }

    /// Takes `scopes` away from the TikTok account's live grants (see the control API).
    /// Returns how many grants changed.
    pub fn withdraw_tiktok_scopes(&self, open_id: &str, scopes: &[String]) -> usize {
        self.tiktok_state().withdraw_scopes(open_id, scopes)
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// Issues `count` TikTok grants for synthetic accounts (see the control API).
    pub fn mint_tiktok_grants(&self, count: usize, scopes: &[String]) -> Vec<serde_json::Value> {
        let now = self.now();
        self.tiktok_state().mint_grants(count, scopes, now)
    }

    /// SHA-256 of every TikTok refresh token that still works.
    pub fn live_tiktok_refresh_tokens(&self) -> Vec<String> {
        let now = self.now();
        self.tiktok_state().live_refresh_token_hashes(now)
    }

    fn tiktok_state(&self) -> MutexGuard<'_, tiktok::TikTokState> {
        self.tiktok.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn instagram_state(&self) -> MutexGuard<'_, instagram::InstagramState> {
        self.instagram.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Meta's signed callbacks (providers.md §3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaCallback {
    /// The user removed the app.
    Deauthorize,
    /// The user asked for their data to be deleted.
    DataDeletion,
}

/// Why an account's tokens were killed (Instagram reports it as a Graph 190 subcode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    /// The user removed the app (subcode 458).
    #[default]
    AppRemoved,
    /// The user changed the password / the session was invalidated (subcode 460).
    PasswordChanged,
}

/// Which endpoint a scripted failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// The code exchange.
    Token,
    /// The refresh (TikTok refresh grant; Instagram `refresh_access_token`).
    Refresh,
    /// The profile call (TikTok user info; Instagram `/me`).
    Profile,
    /// Instagram's short-lived → long-lived exchange.
    ExchangeLongLived,
    /// TikTok's revoke.
    Revoke,
    /// The authorize page (`GET`): only `request_error` applies.
    Authorize,
}

/// What a scripted failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The grant is dead: TikTok `invalid_grant` / `access_token_invalid`; Instagram "Matching
    /// code was not found" on the exchange, Graph 190/463 elsewhere.
    InvalidGrant,
    /// The code is expired or unknown (on token calls; like `invalid_grant` elsewhere).
    BadCode,
    /// A 500: TikTok `server_error` / `internal_error`; Graph code 2 with `is_transient` (or, with
    /// `code` 1, "An unknown error occurred" without it; `status` changes the 500).
    ServerError,
    /// A 429 with `Retry-After: retry_after_secs`: TikTok `rate_limit_exceeded` (enveloped on
    /// user info; on the OAuth endpoints, whose limits are unconfirmed, in the OAuth shape);
    /// Instagram's Graph endpoints a plain 429 with no Graph error (§3.10), its code exchange its
    /// own three-field shape.
    RateLimit,
    /// Graph-style rate limiting: 400 with code 4, no `Retry-After` (TikTok: like `rate_limit`).
    GraphRateLimit,
    /// Waits `slow_ms`, then answers normally.
    Slow,
    /// Waits until the control API releases it (`POST /control/{provider}/release`), or for
    /// `slow_ms` at most, then answers normally: a test awaits the call's arrival (`held` in the
    /// stats), acts while the call is under way, then lets it go on.
    Hold,
    /// TikTok's token and refresh calls only: handles the call at once (a refresh rotates the
    /// refresh token), then waits `slow_ms` before answering: a caller that stops waiting has
    /// lost an answer the provider already acted on.
    SlowAnswer,
    /// An HTML page from a proxy (status `status`, default 502).
    HtmlError,
    /// TikTok 401 `access_token_invalid`; Graph 190 without subcode.
    AccessTokenInvalid,
    /// TikTok 401 `scope_not_authorized` (user info only); Graph code 10.
    ScopeNotAuthorized,
    /// TikTok 503 `temporarily_unavailable` (an OAuth error: the token, refresh and revoke
    /// endpoints only); Graph code 2 "Service temporarily unavailable" with `is_transient`, 503.
    TemporarilyUnavailable,
    /// TikTok 400 `scope_permission_missed` (user info only); Graph code 200 "Permissions
    /// error".
    ScopePermissionMissed,
    /// A wrong client secret (`token`, and TikTok's `refresh` and `revoke`): the call is checked
    /// as if it carried another secret, so the answer is the one a wrong secret gets (TikTok
    /// `invalid_client`; Instagram's 400 "Error validating client secret.").
    InvalidClient,
    /// A code exchange (`token`) whose `redirect_uri` differs from the authorize request's: the
    /// code is spent and TikTok answers `invalid_request`, Instagram its 400 three-field error.
    RedirectUriMismatch,
    /// TikTok only: a code exchange (`token`) whose `code_verifier` does not match the
    /// challenge: the code is spent and the answer is `invalid_request` "Code verifier or code
    /// challenge is invalid." (also for a code issued without a challenge, `pkce_optional`).
    PkceMismatch,
    /// The authorize page (`authorize`) refuses the request as if `parameter` (default
    /// `redirect_uri`) were wrong: its HTML error page naming the parameter, no redirect.
    RequestError,
    /// TikTok only: the authorize request (`authorize`), its redirect URI checked, is answered by
    /// a redirect back to it with `error` (one of TikTok's documented values, default
    /// `server_error`), `error_description` and `state`, without a consent screen (§2.2).
    CallbackError,
}

/// The `error` values TikTok documents for its authorize redirect (§2.2), but `access_denied`,
/// which the consent page's Deny gives.
const TIKTOK_CALLBACK_ERRORS: [&str; 9] = [
    "invalid_client",
    "invalid_grant",
    "invalid_request",
    "invalid_scope",
    "unauthorized_client",
    "unsupported_grant_type",
    "unsupported_response_type",
    "server_error",
    "temporarily_unavailable",
];

impl FailureKind {
    /// The endpoints of `platform` this kind can be scripted on; `None` when it applies to any
    /// endpoint but `authorize`.
    fn endpoints(self, platform: Platform) -> Option<&'static [Endpoint]> {
        match (self, platform) {
            (FailureKind::RequestError, _) | (FailureKind::CallbackError, Platform::Tiktok) => {
                Some(&[Endpoint::Authorize])
            }
            (FailureKind::CallbackError, Platform::Instagram) => Some(&[]),
            (FailureKind::InvalidClient, Platform::Tiktok) => {
                Some(&[Endpoint::Token, Endpoint::Refresh, Endpoint::Revoke])
            }
            (FailureKind::InvalidClient | FailureKind::RedirectUriMismatch, _)
            | (FailureKind::PkceMismatch, Platform::Tiktok) => Some(&[Endpoint::Token]),
            (FailureKind::PkceMismatch, Platform::Instagram) => Some(&[]),
            (FailureKind::SlowAnswer, Platform::Tiktok) => Some(&[Endpoint::Token, Endpoint::Refresh]),
            (FailureKind::SlowAnswer, Platform::Instagram) => Some(&[]),
            // TikTok's user-info API codes (§2.8) belong to user info, and `temporarily_unavailable`
            // to the OAuth endpoints (§2.2): neither is sent by the other.
            (FailureKind::ScopeNotAuthorized | FailureKind::ScopePermissionMissed, Platform::Tiktok) => {
                Some(&[Endpoint::Profile])
            }
            (FailureKind::TemporarilyUnavailable, Platform::Tiktok) => {
                Some(&[Endpoint::Token, Endpoint::Refresh, Endpoint::Revoke])
            }
            _ => None,
        }
    }
}

/// One scripted failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailNext {
    /// The endpoint it applies to.
    pub endpoint: Endpoint,
    /// What happens.
    pub kind: FailureKind,
    /// How many calls it applies to (default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// The HTTP status of an `html_error` (default 502), of Instagram's `graph_rate_limit`
    /// (400, 403 or 429; default 400) or of Instagram's `server_error` (400, 500 or 503; default
    /// 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Instagram's `graph_rate_limit`: the Graph code, 4, 17, 32 or 613 (default 4); Instagram's
    /// `server_error`: 1 (an unknown error, without `is_transient`) or 2 (default, with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// `request_error`: the authorize parameter refused (default `redirect_uri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// `callback_error`: the `error` of the redirect (default `server_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FailNext {
    /// Refuses an entry that cannot happen at `platform`'s endpoint.
    fn check(&self, platform: Platform) -> Result<(), String> {
        let kind = serde_json::to_value(self.kind).ok();
        let kind = kind.as_ref().and_then(serde_json::Value::as_str).unwrap_or("?");
        let endpoint = serde_json::to_value(self.endpoint).ok();
        let endpoint = endpoint.as_ref().and_then(serde_json::Value::as_str).unwrap_or("?");
        let fits = match self.kind.endpoints(platform) {
            Some(endpoints) => endpoints.contains(&self.endpoint),
            None => self.endpoint != Endpoint::Authorize,
        };
        if !fits {
            return Err(format!("{kind} cannot be scripted on {platform}'s {endpoint} endpoint"));
        }
        let revoke_or_exchange = match platform {
            Platform::Tiktok => Endpoint::ExchangeLongLived,
            Platform::Instagram => Endpoint::Revoke,
        };
        if self.endpoint == revoke_or_exchange {
            return Err(format!("{platform} has no {endpoint} endpoint"));
        }
        if let Some(parameter) = &self.parameter {
            if self.kind != FailureKind::RequestError {
                return Err("parameter applies to request_error only".into());
            }
            if Tamper::invalid_value(platform, parameter).is_none() {
                return Err(format!("request_error cannot refuse the parameter `{parameter}` at {platform}"));
            }
        }
        if let Some(error) = &self.error {
            if self.kind != FailureKind::CallbackError {
                return Err("error applies to callback_error only".into());
            }
            if !TIKTOK_CALLBACK_ERRORS.contains(&error.as_str()) {
                return Err(format!("callback_error takes one of {}", TIKTOK_CALLBACK_ERRORS.join(", ")));
            }
        }
        if let Some(code) = self.code {
            match (self.kind, platform) {
                (FailureKind::GraphRateLimit, Platform::Instagram) => {
                    if ![4, 17, 32, 613].contains(&code) {
                        return Err("graph_rate_limit's code must be 4, 17, 32 or 613".into());
                    }
                }
                (FailureKind::ServerError, Platform::Instagram) => {
                    if self.endpoint == Endpoint::Token {
                        return Err(
                            "the code exchange answers its own error shape, without a Graph code".into()
                        );
                    }
                    if ![1, 2].contains(&code) {
                        return Err("server_error's code must be 1 or 2".into());
                    }
                }
                _ => return Err("code applies to instagram's graph_rate_limit and server_error only".into()),
            }
        }
        if let Some(status) = self.status {
            let ok = match (self.kind, platform) {
                (FailureKind::HtmlError, _) => (200..=599).contains(&status),
                (FailureKind::GraphRateLimit, Platform::Instagram) => [400, 403, 429].contains(&status),
                (FailureKind::ServerError, Platform::Instagram) => {
                    self.endpoint != Endpoint::Token && [400, 500, 503].contains(&status)
                }
                _ => false,
            };
            if !ok {
                return Err("status applies to html_error (200-599), instagram's graph_rate_limit \
                            (400, 403, 429) and instagram's server_error off the code exchange (400, 500, 503) only"
                    .into());
            }
        }
        Ok(())
    }
}

/// What a scripted failure makes of a call.
enum Scripted {
    /// Answer this instead of handling the call.
    Answer(Response),
    /// Handle the call, checking it as if it carried a wrong value.
    Tamper(Tamper),
    /// Check the authorize request, then redirect back with this `error`.
    CallbackError(String),
    /// Handle the call, then wait this long before answering.
    AnswerLate(std::time::Duration),
}

/// A wrong value a scripted failure puts into a request before the endpoint's own checks run,
/// so that the answer, and what the request does to codes, is exactly the real check's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tamper {
    /// `client_secret`.
    ClientSecret,
    /// `redirect_uri`, changed from the one the code was issued for.
    RedirectUri,
    /// `code_verifier`: well formed, but not the challenge's.
    CodeVerifier,
    /// An authorize parameter.
    Parameter(String),
}

impl Tamper {
    /// The tamper of a scripted failure, if it is one.
    fn of(failure: &FailNext) -> Option<Self> {
        match failure.kind {
            FailureKind::InvalidClient => Some(Tamper::ClientSecret),
            FailureKind::RedirectUriMismatch => Some(Tamper::RedirectUri),
            FailureKind::PkceMismatch => Some(Tamper::CodeVerifier),
            FailureKind::RequestError => {
                Some(Tamper::Parameter(failure.parameter.clone().unwrap_or_else(|| "redirect_uri".into())))
            }
            _ => None,
        }
    }

    /// A value of the authorize parameter `name` that `platform`'s checks refuse.
    fn invalid_value(platform: Platform, name: &str) -> Option<&'static str> {
        match (platform, name) {
            (Platform::Tiktok, "client_key") | (Platform::Instagram, "client_id") => {
                Some("sandbox-unknown-app")
            }
            (_, "redirect_uri") => Some("https://unregistered.invalid/callback"),
            (_, "response_type") => Some("token"),
            (_, "scope") => Some("unknown.scope"),
            (Platform::Tiktok, "code_challenge") => Some("not-a-challenge"),
            (Platform::Tiktok, "code_challenge_method") => Some("plain"),
            _ => None,
        }
    }

    /// Puts the wrong value into `p`.
    fn apply(&self, platform: Platform, p: &mut Params) {
        match self {
            Tamper::ClientSecret => p.set("client_secret", "sandbox-wrong-client-secret"),
            Tamper::RedirectUri => {
                let other = format!("{}/elsewhere", p.get("redirect_uri").unwrap_or_default());
                p.set("redirect_uri", &other);
            }
            // 64 characters of the verifier alphabet: well formed, and no real verifier.
            Tamper::CodeVerifier => p.set("code_verifier", &"0".repeat(64)),
            Tamper::Parameter(name) => {
                if let Some(value) = Self::invalid_value(platform, name) {
                    p.set(name, value);
                }
            }
        }
    }
}

fn one() -> u32 {
    1
}

/// TikTok's token lifetimes preset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifetimes {
    /// Access 86400 s, refresh 31536000 s (the older docs).
    #[default]
    Long,
    /// Access 7200 s, refresh 15552000 s (the newer docs).
    Short,
}

/// What TikTok's refresh does with the refresh token sent: rotation is documented for the newer
/// API (§2.5) and the sandbox's default; the older behaviour is not settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshRotation {
    /// A new refresh token with every refresh; the one sent dies at once.
    #[default]
    Rotate,
    /// The same refresh token comes back (with its remaining lifetime) and stays valid.
    Keep,
    /// The answer carries no refresh token; the one sent stays valid.
    Omit,
}

/// Which account id Instagram's code exchange answers as `user_id` (unconfirmed, §3.6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeUserId {
    /// The professional account's id, as `/me` `user_id`.
    #[default]
    Professional,
    /// The app-scoped id, as `/me` `id`.
    AppScoped,
}

/// What Instagram does when a personal (not professional) account logs in to an app of
/// Instagram Login, which serves professional accounts only: unconfirmed (§3.10).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PersonalAccount {
    /// The login goes through; `/me` then reports `account_type` `PERSONAL`.
    #[default]
    Allow,
    /// The login is refused on Instagram's own page: no code, no way back to the app.
    RefuseLogin,
}

/// The shape of Instagram's code-exchange answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenShape {
    /// `{access_token, user_id: <number>, permissions: [..]}` (what clients observe).
    #[default]
    Flat,
    /// `{data: [{access_token, user_id: "<string>", permissions: "a,b"}]}` (what the docs show).
    Wrapped,
}

/// What Instagram answers to a refresh of a token younger than `refresh_min_age_secs`. The
/// real answer is unconfirmed (providers.md §3.5); both are 400 Graph errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TooEarly {
    /// Code 100, a request error: the token stays valid.
    #[default]
    #[serde(rename = "code_100")]
    Code100,
    /// Code 190 without a subcode, as for an invalid token (the token stays valid all the same).
    #[serde(rename = "code_190")]
    Code190,
}

/// Whether the provider sends `state` back with an error to the callback (unconfirmed for both,
/// providers.md §2.2 and §3.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorState {
    /// `state` comes back, as on success.
    #[default]
    Echo,
    /// Only the error parameters come back.
    Omit,
}

/// The HTTP status of TikTok's OAuth error answers (token, refresh, revoke), unconfirmed
/// (providers.md §2.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OauthErrorStatus {
    /// A 4xx or 5xx matching the error.
    #[default]
    Http,
    /// 200, with the error in the body.
    Ok,
}

/// How TikTok's user-info API answers an error (providers.md §2.8): real answers nest the error
/// struct under `error`, the docs print it flat, and whether `data` is `{}` or absent beside a
/// nested error is unconfirmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorShape {
    /// `{"data": {}, "error": {code, message, log_id}}`.
    #[default]
    Nested,
    /// `{"error": {code, message, log_id}}`, without `data`.
    NestedNoData,
    /// `{code, message, log_id}` at the top level, as the docs print it.
    Flat,
}

/// The shape of Instagram's `/me` answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeShape {
    /// The fields at the top level (what clients observe).
    #[default]
    Flat,
    /// `{data: [{...}]}`, the wrapper §3.6 shows.
    Wrapped,
}

/// Which secret signs Meta's deauthorize and data-deletion requests for an Instagram-Login app:
/// unconfirmed (providers.md §3.8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningSecret {
    /// The Instagram app secret ([`INSTAGRAM_CLIENT_SECRET`]).
    #[default]
    Instagram,
    /// The Meta app secret ([`META_APP_SECRET`]).
    Meta,
}

/// The scenario switches of one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scenario {
    /// The consent page's Allow behaves as Deny.
    pub deny_all: bool,
    /// Scripted failures, consumed in order per endpoint.
    pub fail_next: VecDeque<FailNext>,
    /// TikTok: accept an authorize request without `code_challenge`.
    pub pkce_optional: bool,
    /// TikTok: token lifetimes.
    pub lifetimes: Lifetimes,
    /// Instagram: the code-exchange answer's shape.
    pub token_shape: TokenShape,
    /// Instagram: the error for refreshing a token that is too young.
    pub refresh_too_early: TooEarly,
    /// Instagram: the youngest a long-lived token may be to be refreshed, in seconds (documented:
    /// 24 h).
    pub refresh_min_age_secs: u64,
    /// The `Retry-After` of `rate_limit` failures, in seconds.
    pub retry_after_secs: u64,
    /// The delay of `slow` failures, in milliseconds.
    pub slow_ms: u64,
    /// Whether `state` comes back with an error to the callback.
    pub error_state: ErrorState,
    /// TikTok: the status of OAuth error answers.
    pub oauth_error_status: OauthErrorStatus,
    /// Instagram: the shape of `/me`.
    pub me_shape: MeShape,
    /// Instagram: the secret that signs Meta's callbacks.
    pub signing_secret: SigningSecret,
    /// TikTok: user-info requests a minute (a one-minute sliding window, §2.8), then 429
    /// `rate_limit_exceeded`; 0: no limit.
    pub rate_limit_per_min: u32,
    /// TikTok: the shape of the user-info API's errors.
    pub api_error_shape: ApiErrorShape,
    /// TikTok: what a refresh does with the refresh token sent.
    pub refresh_rotation: RefreshRotation,
    /// Instagram: which id the code exchange answers as `user_id`.
    pub exchange_user_id: ExchangeUserId,
    /// Instagram: what a personal account's login comes to.
    pub personal_account: PersonalAccount,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            deny_all: false,
            fail_next: VecDeque::new(),
            pkce_optional: false,
            lifetimes: Lifetimes::Long,
            token_shape: TokenShape::Flat,
            refresh_too_early: TooEarly::Code100,
            refresh_min_age_secs: 86_400,
            retry_after_secs: 30,
            slow_ms: 15_000,
            error_state: ErrorState::Echo,
            oauth_error_status: OauthErrorStatus::Http,
            me_shape: MeShape::Flat,
            signing_secret: SigningSecret::Instagram,
            rate_limit_per_min: 600,
            api_error_shape: ApiErrorShape::Nested,
            refresh_rotation: RefreshRotation::Rotate,
            exchange_user_id: ExchangeUserId::Professional,
            personal_account: PersonalAccount::Allow,
        }
    }
}

impl Scenario {
    fn apply(&mut self, patch: ScenarioPatch) {
        if let Some(v) = patch.deny_all {
            self.deny_all = v;
        }
        if let Some(v) = patch.rate_limit_per_min {
            self.rate_limit_per_min = v;
        }
        if let Some(v) = patch.fail_next {
            self.fail_next = v.into_iter().filter(|f| f.count > 0).collect();
        }
        if let Some(v) = patch.pkce_optional {
            self.pkce_optional = v;
        }
        if let Some(v) = patch.lifetimes {
            self.lifetimes = v;
        }
        if let Some(v) = patch.token_shape {
            self.token_shape = v;
        }
        if let Some(v) = patch.refresh_too_early {
            self.refresh_too_early = v;
        }
        if let Some(v) = patch.refresh_min_age_secs {
            self.refresh_min_age_secs = v;
        }
        if let Some(v) = patch.retry_after_secs {
            self.retry_after_secs = v;
        }
        if let Some(v) = patch.slow_ms {
            self.slow_ms = v;
        }
        if let Some(v) = patch.error_state {
            self.error_state = v;
        }
        if let Some(v) = patch.oauth_error_status {
            self.oauth_error_status = v;
        }
        if let Some(v) = patch.me_shape {
            self.me_shape = v;
        }
        if let Some(v) = patch.signing_secret {
            self.signing_secret = v;
        }
        if let Some(v) = patch.api_error_shape {
            self.api_error_shape = v;
        }
        if let Some(v) = patch.refresh_rotation {
            self.refresh_rotation = v;
        }
        if let Some(v) = patch.exchange_user_id {
            self.exchange_user_id = v;
        }
        if let Some(v) = patch.personal_account {
            self.personal_account = v;
        }
    }

    /// Takes the first scripted failure for `endpoint`, if any.
    fn take_failure(&mut self, endpoint: Endpoint) -> Option<FailNext> {
        let idx = self.fail_next.iter().position(|f| f.endpoint == endpoint)?;
        let entry = self.fail_next.get_mut(idx)?;
        let taken = entry.clone();
        entry.count = entry.count.saturating_sub(1);
        if entry.count == 0 {
            self.fail_next.remove(idx);
        }
        Some(taken)
    }
}

/// A change to the scenario switches: only the keys present change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioPatch {
    /// See [`Scenario::deny_all`].
    pub deny_all: Option<bool>,
    /// Replaces the queue of scripted failures.
    pub fail_next: Option<Vec<FailNext>>,
    /// See [`Scenario::pkce_optional`].
    pub pkce_optional: Option<bool>,
    /// See [`Scenario::lifetimes`].
    pub lifetimes: Option<Lifetimes>,
    /// See [`Scenario::token_shape`].
    pub token_shape: Option<TokenShape>,
    /// See [`Scenario::refresh_too_early`].
    pub refresh_too_early: Option<TooEarly>,
    /// See [`Scenario::refresh_min_age_secs`].
    pub refresh_min_age_secs: Option<u64>,
    /// See [`Scenario::retry_after_secs`].
    pub retry_after_secs: Option<u64>,
    /// See [`Scenario::slow_ms`].
    pub slow_ms: Option<u64>,
    /// See [`Scenario::error_state`].
    pub error_state: Option<ErrorState>,
    /// See [`Scenario::oauth_error_status`].
    pub oauth_error_status: Option<OauthErrorStatus>,
    /// See [`Scenario::me_shape`].
    pub me_shape: Option<MeShape>,
    /// See [`Scenario::signing_secret`].
    pub signing_secret: Option<SigningSecret>,
    /// See [`Scenario::rate_limit_per_min`].
    pub rate_limit_per_min: Option<u32>,
    /// See [`Scenario::refresh_rotation`].
    pub refresh_rotation: Option<RefreshRotation>,
    /// See [`Scenario::exchange_user_id`].
    pub exchange_user_id: Option<ExchangeUserId>,
    /// See [`Scenario::personal_account`].
    pub personal_account: Option<PersonalAccount>,
    /// See [`Scenario::api_error_shape`].
    pub api_error_shape: Option<ApiErrorShape>,
}

/// Call counters of one provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// `GET` of the authorize page (valid or not).
    pub authorize_requests: u64,
    /// Code exchanges (TikTok `authorization_code` grants; Instagram `oauth/access_token`).
    pub token_calls: u64,
    /// Refresh calls.
    pub refresh_calls: u64,
    /// Profile calls.
    pub profile_calls: u64,
    /// TikTok revoke calls.
    pub revoke_calls: u64,
    /// Instagram long-lived exchanges.
    pub exchange_long_lived_calls: u64,
    /// Answers that said the grant is dead (TikTok `invalid_grant`; Instagram "Matching code was
    /// not found", Graph 190).
    pub invalid_grant: u64,
    /// Refresh attempts with a refresh token that had already been rotated out.
    pub refresh_token_reuse: u64,
    /// The `code_challenge` values received on authorize requests, oldest first.
    pub challenges: Vec<String>,
    /// Calls a `hold` failure keeps waiting now.
    pub held: u64,
}

impl Stats {
    fn record_challenge(&mut self, challenge: &str) {
        if self.challenges.len() >= MAX_CHALLENGES {
            self.challenges.remove(0);
        }
        self.challenges.push(challenge.to_string());
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared by both simulated providers.
// ---------------------------------------------------------------------------------------------

/// Request parameters (query or form), in order, repeated names kept.
#[derive(Debug, Clone, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn from_urlencoded(bytes: &[u8]) -> Self {
        Self(url::form_urlencoded::parse(bytes).into_owned().collect())
    }

    fn from_query(query: Option<&str>) -> Self {
        Self::from_urlencoded(query.unwrap_or_default().as_bytes())
    }

    /// Parses a form body: urlencoded, or (with `multipart`) `multipart/form-data`.
    fn from_body(headers: &HeaderMap, body: &[u8], multipart: bool) -> Result<Self, String> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("application/x-www-form-urlencoded") {
            return Ok(Self::from_urlencoded(body));
        }
        if multipart && content_type.starts_with("multipart/form-data") {
            let original = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            return parse_multipart(original, body).ok_or_else(|| "malformed multipart body".to_string());
        }
        Err("the body must be application/x-www-form-urlencoded".into())
    }

    /// Replaces every value of `name` with `value`.
    fn set(&mut self, name: &str, value: &str) {
        self.0.retain(|(k, _)| k != name);
        self.0.push((name.to_string(), value.to_string()));
    }

    /// The first value of `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of `name`.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A minimal `multipart/form-data` reader: text fields only, which is all a token request has.
fn parse_multipart(content_type: &str, body: &[u8]) -> Option<Params> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary=").or_else(|| p.strip_prefix("BOUNDARY=")))?
        .trim_matches('"');
    let text = std::str::from_utf8(body).ok()?;
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    for part in text.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.strip_prefix("\r\n").unwrap_or(part);
        let (head, value) = part.split_once("\r\n\r\n")?;
        let value = value.strip_suffix("\r\n").unwrap_or(value);
        let name = head.lines().find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?;
        let name = name.split(';').map(str::trim).find_map(|p| p.strip_prefix("name="))?.trim_matches('"');
        out.push((name.to_string(), value.to_string()));
    }
    Some(Params(out))
}

/// Splits a scope parameter as Instagram does (comma- or space-separated).
fn split_scopes(raw: &str) -> Vec<String> {
    split_list(raw, |c: char| c == ',' || c.is_whitespace())
}

/// Splits a comma-separated list as TikTok does (its `scope` and `fields`): a space is no
/// separator, so an entry with one in it is unknown.
fn split_commas(raw: &str) -> Vec<String> {
    split_list(raw, |c: char| c == ',')
}

fn split_list(raw: &str, separator: impl Fn(char) -> bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in raw.split(separator).filter(|s| !s.is_empty()) {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters (so `*` and `!` are encoded).
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `base?k=v&...` (plus `#fragment`), every value percent-encoded.
fn url_with_query(base: &str, params: &[(&str, &str)], fragment: Option<&str>) -> String {
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", pct(k), pct(v))).collect();
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut out = format!("{base}{sep}{}", query.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// A `302 Found` to `location`.
fn found(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(value) => {
            let mut resp = StatusCode::FOUND.into_response();
            resp.headers_mut().insert(header::LOCATION, value);
            resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "bad redirect location").into_response(),
    }
}

/// A JSON answer that must not be cached (RFC 6749 §5.1).
fn json(status: StatusCode, body: serde_json::Value) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Adds `Retry-After` to a response.
fn with_retry_after(mut resp: Response, secs: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// The HTML page a misbehaving proxy would send.
fn proxy_html_error(status: Option<u16>) -> Response {
    let status = status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = format!(
        "<html><head><title>{status}</title></head><body><center><h1>{status}</h1></center>\
         <hr><center>sandbox-proxy</center></body></html>"
    );
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

/// A random URL-safe string of `N` random bytes (base64url).
fn random_b64<const N: usize>() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::crypto::random_bytes::<N>())
}

/// A TikTok-style `log_id`: a UTC timestamp then random hex.
fn log_id(now: OffsetDateTime) -> String {
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        hex::encode_upper(crate::crypto::random_bytes::<9>())
    )
}

/// Drops entries of `map` for which `dead` holds; if it is still over `cap`, drops the entries
/// that `age` ranks oldest.
fn prune<V, K: Ord + Clone>(
    map: &mut std::collections::HashMap<String, V>,
    cap: usize,
    dead: impl Fn(&V) -> bool,
    age: impl Fn(&V) -> K,
) {
    // Only when full: sweeping on every insert would make issuing n tokens cost O(n²).
    if map.len() < cap {
        return;
    }
    map.retain(|_, v| !dead(v));
    // Evict the oldest down to 90 % of the cap, so the next sweep is far away.
    let target = cap - cap / 10;
    if map.len() > target {
        let mut keys: Vec<(K, String)> = map.iter().map(|(k, v)| (age(v), k.clone())).collect();
        keys.sort();
        let excess = map.len() - target;
        for (_, k) in keys.into_iter().take(excess) {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests;
