//! The sandbox's helpers, and the adapters of [`crate::providers`] driven end to end against the
//! sandbox over real HTTP (one server on a loopback port per test, its own clock).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use url::Url;

use super::*;
use crate::providers::instagram::Instagram;
use crate::providers::tiktok::TikTok;
use crate::providers::{AuthorizeRequest, ProviderError, pkce};

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

#[test]
fn pct_encodes_star_and_bang() {
    assert_eq!(pct("a*b!c d/é~._-"), "a%2Ab%21c%20d%2F%C3%A9~._-");
    assert_eq!(
        url_with_query("https://x/cb", &[("code", "A*1!"), ("state", "s s")], Some("_")),
        "https://x/cb?code=A%2A1%21&state=s%20s#_"
    );
}

#[test]
fn multipart_bodies_are_read() {
    let body = "--XyZ\r\nContent-Disposition: form-data; name=\"client_id\"\r\n\r\nabc\r\n\
                --XyZ\r\nContent-Disposition: form-data; name=\"code\"\r\n\r\nAQ*!\r\n--XyZ--\r\n";
    let p = parse_multipart("multipart/form-data; boundary=XyZ", body.as_bytes()).unwrap();
    assert_eq!(p.get("client_id"), Some("abc"));
    assert_eq!(p.get("code"), Some("AQ*!"));
}

#[test]
fn scripted_failures_are_consumed_in_order_per_endpoint() {
    let mut s = Scenario::default();
    s.apply(ScenarioPatch {
        fail_next: Some(vec![
            FailNext {
                endpoint: Endpoint::Token,
                kind: FailureKind::RateLimit,
                count: 2,
                status: None,
                code: None,
                parameter: None,
                error: None,
            },
            FailNext {
                endpoint: Endpoint::Profile,
                kind: FailureKind::ServerError,
                count: 1,
                status: None,
                code: None,
                parameter: None,
                error: None,
            },
            FailNext {
                endpoint: Endpoint::Token,
                kind: FailureKind::InvalidGrant,
                count: 1,
                status: None,
                code: None,
                parameter: None,
                error: None,
            },
            FailNext {
                endpoint: Endpoint::Refresh,
                kind: FailureKind::Slow,
                count: 0,
                status: None,
                code: None,
                parameter: None,
                error: None,
            },
        ]),
        ..ScenarioPatch::default()
    });
    assert_eq!(s.fail_next.len(), 3, "count 0 entries are dropped");
    let kind = |s: &mut Scenario, e| s.take_failure(e).map(|f| f.kind);
    assert_eq!(kind(&mut s, Endpoint::Token), Some(FailureKind::RateLimit));
    assert_eq!(kind(&mut s, Endpoint::Profile), Some(FailureKind::ServerError));
    assert_eq!(kind(&mut s, Endpoint::Token), Some(FailureKind::RateLimit));
    assert_eq!(kind(&mut s, Endpoint::Token), Some(FailureKind::InvalidGrant));
    assert_eq!(kind(&mut s, Endpoint::Token), None);
    assert_eq!(kind(&mut s, Endpoint::Refresh), None);
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

struct Harness {
    base: String,
    config: Config,
    clock: Arc<SystemClock>,
    sandbox: Arc<Sandbox>,
    /// A client that does not follow redirects (the providers' client).
    http: reqwest::Client,
    tiktok: TikTok,
    instagram: Instagram,
}

async fn start_with(control_api: bool, settings: &[(&str, &str)]) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut env = vec![
        ("AUTHLINK_PUBLIC_URL".to_string(), base.clone()),
        ("AUTHLINK_SANDBOX__CONTROL_API".to_string(), control_api.to_string()),
    ];
    env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = Config::load_from(None, &env).unwrap();
    let clock = SystemClock::shared();
    let sandbox = Arc::new(Sandbox::new(&config, Arc::clone(&clock)));
    let app = Router::new().nest("/sandbox", sandbox.router());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = crate::providers::http_client(Duration::from_secs(5));
    let tiktok = TikTok::from_config(&config, http.clone());
    let instagram = Instagram::from_config(&config, http.clone());
    Harness { base, config, clock, sandbox, http, tiktok, instagram }
}

async fn start() -> Harness {
    start_with(true, &[]).await
}

/// What the consent form POST answered.
struct Callback {
    /// The raw `Location` header.
    location: String,
    /// Its decoded query.
    query: HashMap<String, String>,
    fragment: Option<String>,
}

impl Harness {
    fn now(&self) -> time::OffsetDateTime {
        self.clock.now()
    }

    fn tiktok_redirect(&self) -> String {
        self.config.public("/oauth/tiktok/callback")
    }

    fn instagram_redirect(&self) -> String {
        self.config.public("/oauth/instagram/callback")
    }

    async fn control(&self, path: &str, body: Value) -> (u16, Value) {
        let resp =
            self.http.post(format!("{}/sandbox/control{path}", self.base)).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn stats(&self, provider: &str) -> Value {
        let url = format!("{}/sandbox/control/{provider}/stats", self.base);
        self.http.get(url).send().await.unwrap().json().await.unwrap()
    }

    /// Fetches the consent page of `authorize_url`, then posts the form: the authorize query's
    /// pairs as the hidden fields, plus `extra` (decision, account, granted).
    async fn consent(&self, authorize_url: &Url, extra: &[(&str, &str)]) -> Callback {
        let page = self.http.get(authorize_url.clone()).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        let html = page.text().await.unwrap();
        assert!(html.contains("authlink sandbox"));
        assert!(html.contains("name=\"decision\" value=\"allow\""));
        assert!(!html.contains("<script"), "no JavaScript");
        assert!(!html.contains("src=\"https://"), "nothing external");
        let mut form: Vec<(String, String)> = authorize_url.query_pairs().into_owned().collect();
        for (name, _) in &form {
            assert!(html.contains(&format!("name=\"{name}\"")), "hidden field {name} is missing");
        }
        form.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut action = authorize_url.clone();
        action.set_query(None);
        let resp = self.http.post(action).form(&form).send().await.unwrap();
        assert_eq!(resp.status(), 302, "{}", resp.text().await.unwrap_or_default());
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let parsed = Url::parse(&location).unwrap();
        Callback {
            query: parsed.query_pairs().into_owned().collect(),
            fragment: parsed.fragment().map(str::to_string),
            location,
        }
    }

    fn tiktok_authorize_url(&self, verifier: &str, state: &str) -> Url {
        let redirect = self.tiktok_redirect();
        self.tiktok.authorize_url(&AuthorizeRequest {
            state,
            code_verifier: verifier,
            redirect_uri: &redirect,
        })
    }

    fn instagram_authorize_url(&self, state: &str) -> Url {
        let redirect = self.instagram_redirect();
        self.instagram.authorize_url(&AuthorizeRequest {
            state,
            code_verifier: "unused",
            redirect_uri: &redirect,
        })
    }

    /// A full TikTok consent with the default account; returns the code.
    /// A GET of a sandbox path with a bearer token: its status and JSON body.
    async fn get_json(&self, path: &str, token: &SecretString) -> (u16, Value) {
        let resp = self.http.get(format!("{}{path}", self.base)).bearer_auth(token.expose_secret()).send();
        let resp = resp.await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn tiktok_code(&self, verifier: &str) -> String {
        let cb = self.consent(&self.tiktok_authorize_url(verifier, "st"), &[("decision", "allow")]).await;
        cb.query["code"].clone()
    }

    /// A full Instagram consent with `account`; returns the code as the callback saw it.
    async fn instagram_code(&self, account: &str) -> String {
        let cb = self
            .consent(&self.instagram_authorize_url("st"), &[("decision", "allow"), ("account", account)])
            .await;
        cb.query["code"].clone()
    }
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

// ---------------------------------------------------------------------------------------------
// TikTok.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tiktok_full_flow_with_rotation_and_revoke() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let url = h.tiktok_authorize_url(&verifier, "state-1");
    let cb = h.consent(&url, &[("decision", "allow"), ("account", "sbx-oid-brand-0002")]).await;
    assert!(cb.location.starts_with(&h.tiktok_redirect()));
    let code = cb.query["code"].clone();
    assert!(code.contains('*') && code.contains('!'), "{code}");
    assert!(cb.location.contains("%2A") && cb.location.contains("%21"), "{}", cb.location);
    assert_eq!(cb.query["scopes"], "user.info.basic,user.info.profile");
    assert_eq!(cb.query["state"], "state-1");

    let now = h.now();
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), now).await.unwrap();
    assert!(tokens.access_token.expose_secret().starts_with("act."));
    assert_eq!(tokens.access_expires_at, now + time::Duration::seconds(86_400));
    assert_eq!(tokens.refresh_expires_at, Some(now + time::Duration::seconds(31_536_000)));
    assert_eq!(tokens.account_id.as_deref(), Some("sbx-oid-brand-0002"));
    assert_eq!(tokens.scopes, vec!["user.info.basic", "user.info.profile"]);

    let profile = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!(profile.account_id, "sbx-oid-brand-0002");
    assert_eq!(profile.username.as_deref(), Some("sandbox.brand"));
    assert_eq!(profile.display_name.as_deref(), Some("Sandbox Brand Studio"));
    assert!(profile.avatar_url.unwrap().starts_with(&h.base));

    // Rotation: the new refresh token works, the old one is dead at once.
    let old_rt = tokens.refresh_token.clone().unwrap();
    let refreshed = h.tiktok.refresh(&old_rt, h.now()).await.unwrap();
    let new_rt = refreshed.refresh_token.clone().unwrap();
    assert_ne!(new_rt.expose_secret(), old_rt.expose_secret());
    assert!(refreshed.refresh_token.unwrap().expose_secret().starts_with("rft."));
    let err = h.tiktok.refresh(&old_rt, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");
    assert!(!err.to_string().contains(old_rt.expose_secret()));

    h.tiktok.revoke(&refreshed.access_token).await.unwrap();
    let err = h.tiktok.fetch_profile(&refreshed.access_token).await.unwrap_err();
    assert!(matches!(err, ProviderError::AccessTokenInvalid { .. }), "{err:?}");
    let err = h.tiktok.refresh(&new_rt, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");

    let stats = h.stats("tiktok").await;
    assert_eq!(stats["authorize_requests"], 1);
    assert_eq!(stats["token_calls"], 1);
    assert_eq!(stats["refresh_calls"], 3);
    assert_eq!(stats["profile_calls"], 2);
    assert_eq!(stats["revoke_calls"], 1);
    assert_eq!(stats["refresh_token_reuse"], 1);
    assert_eq!(stats["invalid_grant"], 2);
    assert_eq!(stats["challenges"], json!([pkce::s256_hex(&verifier)]));
}

#[tokio::test]
async fn tiktok_partial_grant_still_yields_a_profile() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let url = h.tiktok_authorize_url(&verifier, "s");
    // The browser sends the required scope as a hidden field and no optional one (unticked).
    let cb = h.consent(&url, &[("decision", "allow"), ("granted", "user.info.basic")]).await;
    assert_eq!(cb.query["scopes"], "user.info.basic");
    let tokens =
        h.tiktok.exchange_code(&cb.query["code"], &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    assert_eq!(tokens.scopes, vec!["user.info.basic"]);
    let profile = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!(profile.account_id, TIKTOK_ACCOUNTS[0].open_id);
    assert_eq!(profile.username, None);
    assert_eq!(profile.display_name.as_deref(), Some("Sandbox Creator"));
    // The first call asked for `username` and got scope_not_authorized: the app asked for
    // `user.info.profile`, and the user switched it off (401).
    assert_eq!(h.stats("tiktok").await["profile_calls"], 2);
    let (status, body) =
        h.get_json("/sandbox/tiktok/v2/user/info/?fields=username", &tokens.access_token).await;
    assert_eq!((status, &body["error"]["code"]), (401, &json!("scope_not_authorized")), "{body}");

    // An app that never asked for `user.info.profile`: a field of it is the app's mistake, 400
    // scope_permission_missed; the adapter still falls back to the basic fields.
    let mut basic_only = h.tiktok_authorize_url(&verifier, "s2");
    let pairs: Vec<(String, String)> = basic_only
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "scope" { "user.info.basic".to_string() } else { v.into_owned() };
            (k.into_owned(), v)
        })
        .collect();
    basic_only.query_pairs_mut().clear().extend_pairs(pairs);
    let cb = h.consent(&basic_only, &[("decision", "allow")]).await;
    let tokens =
        h.tiktok.exchange_code(&cb.query["code"], &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    let (status, body) =
        h.get_json("/sandbox/tiktok/v2/user/info/?fields=username", &tokens.access_token).await;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("scope_permission_missed")), "{body}");
    let profile = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!((profile.username, profile.display_name.as_deref()), (None, Some("Sandbox Creator")));
}

#[tokio::test]
async fn tiktok_deny_and_deny_all() {
    let h = start().await;
    let url = h.tiktok_authorize_url(&pkce::new_verifier(), "st-deny");
    let cb = h.consent(&url, &[("decision", "deny")]).await;
    assert_eq!(cb.query["error"], "access_denied");
    assert_eq!(cb.query["state"], "st-deny");
    assert!(cb.query.contains_key("error_description"));
    assert!(!cb.query.contains_key("code"));

    let (status, _) = h.control("/tiktok/scenario", json!({ "deny_all": true })).await;
    assert_eq!(status, 200);
    let cb = h.consent(&url, &[("decision", "allow")]).await;
    assert_eq!(cb.query["error"], "access_denied");
    assert_eq!(h.stats("tiktok").await["token_calls"], 0);
}

#[tokio::test]
async fn tiktok_authorize_errors_name_the_parameter_and_do_not_redirect() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let good = h.tiktok_authorize_url(&verifier, "s");
    let with = |name: &str, value: Option<&str>| {
        let mut url = good.clone();
        let pairs: Vec<(String, String)> =
            good.query_pairs().into_owned().filter(|(k, _)| k != name).collect();
        let mut q = url.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
        if let Some(v) = value {
            q.append_pair(name, v);
        }
        drop(q);
        url
    };
    let cases = [
        ("code_challenge", Some("not-a-challenge".to_string())),
        ("code_challenge", None),
        ("scope", Some("user.info.basic user.info.profile".to_string())),
        ("redirect_uri", Some(format!("{}/oauth/tiktok/callback/", h.base))),
        ("client_key", Some("nope".to_string())),
        ("code_challenge_method", Some("plain".to_string())),
        ("response_type", Some("token".to_string())),
    ];
    for (name, value) in cases {
        let resp = h.http.get(with(name, value.as_deref())).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{name}");
        assert!(resp.headers().get("location").is_none());
        let html = resp.text().await.unwrap();
        assert!(html.contains(&format!("<code>{name}</code>")), "{name}: {html}");
    }
    // A base64url challenge (the RFC 7636 form) is taken at the authorize step and fails at the
    // token endpoint, which compares TikTok's hex form (§2.9).
    let url = with("code_challenge", Some(&pkce::s256_base64url(&verifier)));
    let cb = h.consent(&url, &[("decision", "allow")]).await;
    let err = h
        .tiktok
        .exchange_code(&cb.query["code"], &verifier, &h.tiktok_redirect(), h.now())
        .await
        .unwrap_err();
    let ProviderError::Rejected { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("Code verifier or code challenge is invalid."), "{reason}");
    // PKCE can be made optional.
    h.control("/tiktok/scenario", json!({ "pkce_optional": true })).await;
    let resp = h.http.get(with("code_challenge", None)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // A code issued without a challenge: a scripted PKCE mismatch still fails its exchange, and
    // the next code is exchanged with any verifier.
    h.control("/tiktok/scenario", json!({ "fail_next": [{ "endpoint": "token", "kind": "pkce_mismatch" }] }))
        .await;
    for scripted in [true, false] {
        let cb = h.consent(&with("code_challenge", None), &[("decision", "allow")]).await;
        let exchanged =
            h.tiktok.exchange_code(&cb.query["code"], &verifier, &h.tiktok_redirect(), h.now()).await;
        match exchanged {
            Err(ProviderError::Rejected { reason }) if scripted => {
                assert!(reason.contains("Code verifier or code challenge is invalid."), "{reason}");
            }
            Ok(_) if !scripted => {}
            other => panic!("scripted {scripted}: {other:?}"),
        }
    }
}

/// Instagram's plain 429 (§3.10: the status and `Retry-After`, no Graph error) is a passing
/// failure that says when to come back.
#[tokio::test]
async fn instagram_plain_429_is_a_passing_failure() {
    let h = start().await;
    let code = h.instagram_code("17841400000000001").await;
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.unwrap();
    h.control(
        "/instagram/scenario",
        json!({ "fail_next": [{ "endpoint": "profile", "kind": "rate_limit", "count": 2 }] }),
    )
    .await;
    let resp = h
        .http
        .get(format!("{}/sandbox/instagram/graph/v23.0/me?fields=user_id", h.base))
        .bearer_auth(tokens.access_token.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "30");
    assert!(!resp.text().await.unwrap().contains("\"error\""), "no Graph error");
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    let ProviderError::Transient { retry_after, .. } = err else { panic!("{err:?}") };
    assert_eq!(retry_after, Some(Duration::from_secs(30)));
    assert!(h.instagram.fetch_profile(&tokens.access_token).await.is_ok());
}

#[tokio::test]
async fn tiktok_code_exchange_failures() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let redirect = h.tiktok_redirect();

    // Wrong verifier: the request is refused (PKCE mismatch).
    let code = h.tiktok_code(&verifier).await;
    let err = h.tiktok.exchange_code(&code, &pkce::new_verifier(), &redirect, h.now()).await.unwrap_err();
    let ProviderError::Rejected { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("Code verifier or code challenge is invalid."), "{reason}");
    assert!(!reason.contains(&code));
    // The code was spent by that attempt: reuse is invalid_grant.
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");

    // redirect_uri mismatch.
    let code = h.tiktok_code(&verifier).await;
    let err = h.tiktok.exchange_code(&code, &verifier, &format!("{redirect}/x"), h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Misconfigured { .. }), "{err:?}");

    // Double-encoded code: unknown.
    let code = h.tiktok_code(&verifier).await;
    let encoded = code.replace('*', "%2A").replace('!', "%21");
    let err = h.tiktok.exchange_code(&encoded, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");

    // Expired code (10 minutes).
    let code = h.tiktok_code(&verifier).await;
    h.control("/clock/advance", json!({ "seconds": 601 })).await;
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");

    // Wrong client secret, straight on the wire.
    let code = h.tiktok_code(&verifier).await;
    let resp = h
        .http
        .post(format!("{}/sandbox/tiktok/v2/oauth/token/", h.base))
        .form(&[
            ("client_key", TIKTOK_CLIENT_KEY),
            ("client_secret", "wrong"),
            ("code", code.as_str()),
            ("grant_type", "authorization_code"),
            ("redirect_uri", redirect.as_str()),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert!(body["log_id"].is_string());

    let stats = h.stats("tiktok").await;
    assert_eq!(stats["token_calls"], 6);
    assert_eq!(stats["invalid_grant"], 3);
}

#[tokio::test]
async fn tiktok_request_faults_answer_as_the_real_checks_do() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let redirect = h.tiktok_redirect();
    let (status, scenario) = h
        .control(
            "/tiktok/scenario",
            json!({ "fail_next": [
                { "endpoint": "authorize", "kind": "request_error", "parameter": "code_challenge" },
                { "endpoint": "token", "kind": "invalid_client" },
                { "endpoint": "token", "kind": "redirect_uri_mismatch" },
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{scenario}");

    // The authorize page refuses the request once, naming the parameter, without a redirect.
    let authorize = h.tiktok_authorize_url(&verifier, "st");
    let resp = h.http.get(authorize.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().get("location").is_none());
    assert!(resp.text().await.unwrap().contains("<code>code_challenge</code>"));

    // A wrong client secret is refused before the code is looked at: the code stays good.
    let code = h.tiktok_code(&verifier).await;
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    let ProviderError::Misconfigured { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("invalid_client"), "{reason}");
    // A redirect_uri that differs spends the code, as the real check does.
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Misconfigured { .. }), "{err:?}");
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "spent: {err:?}");
    // A verifier that does not match the challenge, likewise.
    let (status, _) = h
        .control(
            "/tiktok/scenario",
            json!({ "fail_next": [
                { "endpoint": "token", "kind": "pkce_mismatch" },
                { "endpoint": "refresh", "kind": "invalid_client" },
                { "endpoint": "revoke", "kind": "invalid_client" },
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    let code = h.tiktok_code(&verifier).await;
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    let ProviderError::Rejected { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("Code verifier or code challenge is invalid."), "{reason}");
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "spent: {err:?}");

    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap();
    let rt = tokens.refresh_token.clone().unwrap();
    let err = h.tiktok.refresh(&rt, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Misconfigured { .. }), "{err:?}");
    // Refused for the client, the refresh token was not rotated.
    assert!(h.tiktok.refresh(&rt, h.now()).await.is_ok());
    let err = h.tiktok.revoke(&tokens.access_token).await.unwrap_err();
    assert!(matches!(err, ProviderError::Misconfigured { .. }), "{err:?}");
    assert!(h.sandbox.scenario(Platform::Tiktok).fail_next.is_empty());
}

#[tokio::test]
async fn tiktok_oauth_errors_on_a_200_and_denials_without_state() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let redirect = h.tiktok_redirect();
    let (status, _) = h.control("/tiktok/scenario", json!({ "oauth_error_status": "ok" })).await;
    assert_eq!(status, 200);
    // A real refusal on the wire: 200, the error in the body.
    let resp = h
        .http
        .post(format!("{}/sandbox/tiktok/v2/oauth/token/", h.base))
        .form(&[
            ("client_key", TIKTOK_CLIENT_KEY),
            ("client_secret", TIKTOK_CLIENT_SECRET),
            ("code", "unknown"),
            ("grant_type", "authorization_code"),
            ("redirect_uri", redirect.as_str()),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_grant");
    // The adapter reads the body, not the status.
    let err = h.tiktok.exchange_code("unknown", &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");
    h.control(
        "/tiktok/scenario",
        json!({ "fail_next": [{ "endpoint": "token", "kind": "rate_limit" }, { "endpoint": "token", "kind": "html_error" }] }),
    )
    .await;
    let code = h.tiktok_code(&verifier).await;
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(err.is_transient(), "a rate limit on a 200: {err:?}");
    let err = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap_err();
    assert!(err.is_transient(), "a proxy's page keeps its status: {err:?}");
    let tokens = h.tiktok.exchange_code(&code, &verifier, &redirect, h.now()).await.unwrap();
    assert!(h.tiktok.revoke(&tokens.access_token).await.is_ok());

    // `state` left out of an error redirect.
    h.control("/tiktok/scenario", json!({ "error_state": "omit" })).await;
    let cb = h.consent(&h.tiktok_authorize_url(&verifier, "st"), &[("decision", "deny")]).await;
    assert_eq!(cb.query.get("error").map(String::as_str), Some("access_denied"));
    assert!(!cb.query.contains_key("state"), "{}", cb.location);
    let cb = h.consent(&h.tiktok_authorize_url(&verifier, "st"), &[("decision", "allow")]).await;
    assert_eq!(cb.query.get("state").map(String::as_str), Some("st"), "success still carries it");
}

#[tokio::test]
async fn tiktok_scripted_failures_are_classified() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let redirect = h.tiktok_redirect();
    let (status, scenario) = h
        .control(
            "/tiktok/scenario",
            json!({ "retry_after_secs": 7, "fail_next": [
                { "endpoint": "token", "kind": "rate_limit" },
                { "endpoint": "token", "kind": "server_error" },
                { "endpoint": "token", "kind": "html_error" },
                { "endpoint": "token", "kind": "html_error", "status": 200 },
                { "endpoint": "profile", "kind": "scope_not_authorized", "count": 2 },
                { "endpoint": "profile", "kind": "access_token_invalid" },
                { "endpoint": "refresh", "kind": "invalid_grant" },
                { "endpoint": "revoke", "kind": "server_error" },
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{scenario}");
    assert_eq!(scenario["fail_next"].as_array().unwrap().len(), 8);
    let code = h.tiktok_code(&verifier).await;
    let exchange = || h.tiktok.exchange_code(&code, &verifier, &redirect, h.now());

    let ProviderError::Transient { retry_after, .. } = exchange().await.unwrap_err() else { panic!() };
    assert_eq!(retry_after, Some(Duration::from_secs(7)));
    assert!(exchange().await.unwrap_err().is_transient());
    assert!(exchange().await.unwrap_err().is_transient(), "HTML on a 502");
    assert!(matches!(exchange().await.unwrap_err(), ProviderError::Rejected { .. }), "HTML on a 200");
    // The scripted failures short-circuit: the code is still good.
    let tokens = exchange().await.unwrap();

    assert!(matches!(h.tiktok.fetch_profile(&tokens.access_token).await, Err(ProviderError::Scope { .. })));
    assert!(matches!(
        h.tiktok.fetch_profile(&tokens.access_token).await,
        Err(ProviderError::AccessTokenInvalid { .. })
    ));
    assert!(h.tiktok.fetch_profile(&tokens.access_token).await.is_ok());

    let rt = tokens.refresh_token.unwrap();
    assert!(matches!(h.tiktok.refresh(&rt, h.now()).await, Err(ProviderError::Permanent { .. })));
    assert!(h.tiktok.refresh(&rt, h.now()).await.is_ok());
    assert!(h.tiktok.revoke(&tokens.access_token).await.unwrap_err().is_transient());
    assert!(h.sandbox.scenario(Platform::Tiktok).fail_next.is_empty());
}

#[tokio::test]
async fn tiktok_slow_answers_time_out_as_transient() {
    let h = start().await;
    h.control(
        "/tiktok/scenario",
        json!({ "slow_ms": 2000, "fail_next": [{ "endpoint": "profile", "kind": "slow" }] }),
    )
    .await;
    let impatient = TikTok::from_config(&h.config, crate::providers::http_client(Duration::from_millis(300)));
    let err = impatient.fetch_profile(&secret("act.whatever")).await.unwrap_err();
    let ProviderError::Transient { reason, .. } = err else { panic!("{err:?}") };
    assert!(reason.contains("timed out"), "{reason}");
}

#[tokio::test]
async fn tiktok_lifetimes_follow_the_clock() {
    let h = start().await;
    h.control("/tiktok/scenario", json!({ "lifetimes": "short" })).await;
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let now = h.now();
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), now).await.unwrap();
    assert_eq!(tokens.access_expires_at, now + time::Duration::seconds(7_200));
    assert_eq!(tokens.refresh_expires_at, Some(now + time::Duration::seconds(15_552_000)));

    h.control("/clock/advance", json!({ "seconds": 7_201 })).await;
    let err = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap_err();
    assert!(matches!(err, ProviderError::AccessTokenInvalid { .. }), "{err:?}");
    let refreshed = h.tiktok.refresh(tokens.refresh_token.as_ref().unwrap(), h.now()).await.unwrap();
    assert!(h.tiktok.fetch_profile(&refreshed.access_token).await.is_ok());

    h.control("/clock/advance", json!({ "seconds": 15_552_001 })).await;
    let err = h.tiktok.refresh(refreshed.refresh_token.as_ref().unwrap(), h.now()).await.unwrap_err();
    let ProviderError::Permanent { reason } = err else { panic!("{err:?}") };
    assert!(reason.contains("expired"), "{reason}");
}

#[tokio::test]
async fn tiktok_account_revocation_kills_tokens() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    let (status, body) =
        h.control(&format!("/tiktok/accounts/{}/revoke", TIKTOK_ACCOUNTS[0].open_id), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["revoked_tokens"], 2);
    assert!(matches!(
        h.tiktok.fetch_profile(&tokens.access_token).await,
        Err(ProviderError::AccessTokenInvalid { .. })
    ));
    assert!(matches!(
        h.tiktok.refresh(tokens.refresh_token.as_ref().unwrap(), h.now()).await,
        Err(ProviderError::Permanent { .. })
    ));
}

#[tokio::test]
async fn tiktok_access_token_revoked_alone_is_cured_by_a_refresh() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    let open_id = TIKTOK_ACCOUNTS[0].open_id;
    let (status, body) =
        h.control(&format!("/tiktok/accounts/{open_id}/revoke-access-tokens"), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["revoked_tokens"], 1);
    // The access token is dead: not yet a dead grant.
    let err = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap_err();
    assert!(matches!(err, ProviderError::AccessTokenInvalid { .. }), "{err:?}");
    assert!(!err.to_string().contains(tokens.access_token.expose_secret()));
    // The refresh token still works, and so does the access token it brings.
    let refreshed = h.tiktok.refresh(tokens.refresh_token.as_ref().unwrap(), h.now()).await.unwrap();
    assert!(h.tiktok.fetch_profile(&refreshed.access_token).await.is_ok());
    assert!(h.tiktok.fetch_profile(&tokens.access_token).await.is_err(), "the killed one stays dead");
    // Revoking the grant with the killed token still works (it belongs to the grant).
    h.tiktok.revoke(&tokens.access_token).await.unwrap();
    assert!(h.tiktok.fetch_profile(&refreshed.access_token).await.is_err());
    // Instagram has no refresh token: there is no such switch.
    let (status, _) =
        h.control("/instagram/accounts/17841400000000001/revoke-access-tokens", json!({})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn tiktok_scopes_withdrawn_show_in_the_next_refresh() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    assert_eq!(tokens.scopes, ["user.info.basic", "user.info.profile"]);
    let open_id = TIKTOK_ACCOUNTS[0].open_id;
    let path = format!("/tiktok/accounts/{open_id}/withdraw-scopes");
    // What cannot be withdrawn is refused, and changes nothing.
    for (body, status) in [
        (json!({ "scopes": ["user.info.basic"] }), 400),
        (json!({ "scopes": ["user.info.nonsense"] }), 400),
        (json!({ "scopes": [] }), 400),
        (json!({ "scope": ["user.info.profile"] }), 400),
    ] {
        assert_eq!(h.control(&path, body.clone()).await.0, status, "{body}");
    }
    let (status, _) = h
        .control("/tiktok/accounts/nobody/withdraw-scopes", json!({ "scopes": ["user.info.profile"] }))
        .await;
    assert_eq!(status, 404);
    let whole = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!(whole.username.as_deref(), Some(TIKTOK_ACCOUNTS[0].username));
    assert!(whole.withheld_scopes.is_empty());

    let (status, body) = h.control(&path, json!({ "scopes": ["user.info.profile"] })).await;
    assert_eq!(status, 200);
    assert_eq!(body["grants"], 1);
    // The token lives on, for the basic fields only (the adapter falls back to them).
    let profile = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!(profile.account_id, open_id);
    assert_eq!(profile.username, None);
    assert_eq!(profile.withheld_scopes, ["user.info.profile"], "the adapter says what was withheld");
    // The refresh reports the smaller grant.
    let refreshed = h.tiktok.refresh(tokens.refresh_token.as_ref().unwrap(), h.now()).await.unwrap();
    assert_eq!(refreshed.scopes, ["user.info.basic"]);
    // Withdrawing again changes no grant.
    let (_, body) = h.control(&path, json!({ "scopes": ["user.info.profile"] })).await;
    assert_eq!(body["grants"], 0);
}

/// A health check's profile call names each withdrawn scope it can see, `user.info.stats`
/// included, asking for each alone only when TikTok refuses them together.
#[tokio::test]
async fn tiktok_profile_check_names_each_withdrawn_scope() {
    let scopes = "[user.info.basic,user.info.profile,user.info.stats]";
    let h = start_with(true, &[("AUTHLINK_PROVIDERS__TIKTOK__SCOPES", scopes)]).await;
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    assert_eq!(tokens.scopes, ["user.info.basic", "user.info.profile", "user.info.stats"]);
    let granted = tokens.scopes.clone();
    let account = TIKTOK_ACCOUNTS[0];
    let path = format!("/tiktok/accounts/{}/withdraw-scopes", account.open_id);
    let whole = h.tiktok.check_profile(&tokens.access_token, &granted).await.unwrap();
    assert_eq!(whole.username.as_deref(), Some(account.username));
    assert!(whole.withheld_scopes.is_empty());
    // `fields` is comma-separated: with spaces, the field is unknown.
    let resp = h
        .http
        .get(format!("{}/sandbox/tiktok/v2/user/info/", h.base))
        .query(&[("fields", "open_id display_name")])
        .bearer_auth(tokens.access_token.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_params", "{body}");

    assert_eq!(h.control(&path, json!({ "scopes": ["user.info.stats"] })).await.0, 200);
    let checked = h.tiktok.check_profile(&tokens.access_token, &granted).await.unwrap();
    assert_eq!(checked.withheld_scopes, ["user.info.stats"]);
    assert_eq!(checked.username.as_deref(), Some(account.username), "the handle is still read");
    // The connect flow's profile call does not ask for stats, so it cannot see this.
    assert!(h.tiktok.fetch_profile(&tokens.access_token).await.unwrap().withheld_scopes.is_empty());
    // A grant without stats is not asked about them.
    let without: Vec<String> = granted.iter().filter(|s| *s != "user.info.stats").cloned().collect();
    let fine = h.tiktok.check_profile(&tokens.access_token, &without).await.unwrap();
    assert!(fine.withheld_scopes.is_empty());

    assert_eq!(h.control(&path, json!({ "scopes": ["user.info.profile"] })).await.0, 200);
    let checked = h.tiktok.check_profile(&tokens.access_token, &granted).await.unwrap();
    assert_eq!(checked.withheld_scopes, ["user.info.profile", "user.info.stats"]);
    assert_eq!(checked.account_id, account.open_id);
    assert_eq!(checked.username, None);
    assert_eq!(checked.display_name.as_deref(), Some(account.display_name));
}

/// User info is limited to a number of requests a minute, in a one-minute sliding window
/// (600 by default, as documented); a request over it gets 429 `rate_limit_exceeded` with
/// `Retry-After`, which the adapter reads as transient.
#[tokio::test]
async fn tiktok_user_info_is_rate_limited() {
    let h = start().await;
    let (status, _) = h.control("/instagram/scenario", json!({ "rate_limit_per_min": 3 })).await;
    assert_eq!(status, 400, "TikTok's limit only");
    let (status, body) = h.control("/tiktok/scenario", json!({ "rate_limit_per_min": 3 })).await;
    assert_eq!(status, 200, "{body}");
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    for _ in 0..3 {
        h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    }
    let err = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap_err();
    let ProviderError::Transient { retry_after, .. } = &err else { panic!("{err:?}") };
    assert!(retry_after.is_some_and(|d| d.as_secs() >= 1 && d.as_secs() <= 60), "{err:?}");
    // The window slides: a minute later the calls go through again.
    h.control("/clock/advance", json!({ "seconds": 61 })).await;
    h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    // Off.
    h.control("/tiktok/scenario", json!({ "rate_limit_per_min": 0 })).await;
    for _ in 0..5 {
        h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    }
}

#[tokio::test]
async fn tiktok_bulk_grants_have_profiles_and_refresh() {
    let h = start().await;
    let (status, body) = h.control("/tiktok/grants", json!({ "count": 2 })).await;
    assert_eq!(status, 200);
    let grants = body["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 2);
    for g in grants {
        let open_id = g["open_id"].as_str().unwrap();
        let n = open_id.strip_prefix("sbx-oid-bulk-").unwrap();
        let access = SecretString::from(g["access_token"].as_str().unwrap().to_string());
        let profile = h.tiktok.fetch_profile(&access).await.unwrap();
        assert_eq!(profile.account_id, open_id);
        assert_eq!(profile.username.as_deref(), Some(format!("sandbox.bulk.{n}").as_str()));
        assert_eq!(profile.display_name.as_deref(), Some(format!("Sandbox Bulk {n}").as_str()));
        let refresh = SecretString::from(g["refresh_token"].as_str().unwrap().to_string());
        let refreshed = h.tiktok.refresh(&refresh, h.now()).await.unwrap();
        assert_eq!(refreshed.account_id.as_deref(), Some(open_id));
    }
}

// ---------------------------------------------------------------------------------------------
// Instagram.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn instagram_full_flow() {
    let h = start().await;
    let url = h.instagram_authorize_url("ig-state");
    let cb = h.consent(&url, &[("decision", "allow")]).await;
    assert!(cb.location.starts_with(&h.instagram_redirect()));
    assert!(cb.location.ends_with("#_"), "{}", cb.location);
    assert_eq!(cb.fragment.as_deref(), Some("_"));
    assert_eq!(cb.query["state"], "ig-state");

    // A code that still carries the `#_` suffix (pasted, forwarded by JS) works too.
    let code = format!("{}#_", cb.query["code"]);
    let now = h.now();
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), now).await.unwrap();
    assert_eq!(tokens.account_id.as_deref(), Some("17841400000000001"));
    assert_eq!(tokens.scopes, vec!["instagram_business_basic"]);
    assert!(tokens.refresh_token.is_none());
    assert_eq!(tokens.access_expires_at, now + time::Duration::seconds(5_183_944));

    let profile = h.instagram.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!(profile.account_id, "17841400000000001");
    assert_eq!(profile.app_scoped_id.as_deref(), Some("27640875392278831"));
    assert_eq!(profile.username.as_deref(), Some("sandbox.business"));
    assert_eq!(profile.display_name.as_deref(), Some("Sandbox Business"));

    // Too early to refresh: refused, but not a dead grant.
    let err = h.instagram.refresh(&tokens.access_token, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Rejected { .. }), "{err:?}");
    h.control("/clock/advance", json!({ "seconds": 25 * 3600 })).await;
    let now = h.now();
    let refreshed = h.instagram.refresh(&tokens.access_token, now).await.unwrap();
    assert_ne!(refreshed.access_token.expose_secret(), tokens.access_token.expose_secret());
    assert_eq!(refreshed.access_expires_at, now + time::Duration::seconds(5_183_944));
    // The old token stays valid until its own expiry.
    assert!(h.instagram.fetch_profile(&tokens.access_token).await.is_ok());
    assert!(h.instagram.fetch_profile(&refreshed.access_token).await.is_ok());

    // After its expiry, the old one is dead: Graph 190/463.
    h.control("/clock/advance", json!({ "seconds": 5_183_944 - 25 * 3600 + 1 })).await;
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    let ProviderError::Permanent { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("expired"), "{reason}");
    assert!(!reason.contains(tokens.access_token.expose_secret()));
    assert!(matches!(
        h.instagram.refresh(&tokens.access_token, h.now()).await,
        Err(ProviderError::Permanent { .. })
    ));
    assert!(h.instagram.fetch_profile(&refreshed.access_token).await.is_ok());

    let stats = h.stats("instagram").await;
    assert_eq!(stats["authorize_requests"], 1);
    assert_eq!(stats["token_calls"], 1);
    assert_eq!(stats["exchange_long_lived_calls"], 1);
    assert_eq!(stats["refresh_calls"], 3);
    assert_eq!(stats["challenges"], json!([]));
}

#[tokio::test]
async fn instagram_answers_flat_json_with_a_huge_numeric_user_id() {
    let h = start().await;
    let code = h.instagram_code("17841400000000003").await;
    let resp = h
        .http
        .post(format!("{}/sandbox/instagram/oauth/access_token", h.base))
        .form(&[
            ("client_id", INSTAGRAM_CLIENT_ID),
            ("client_secret", INSTAGRAM_CLIENT_SECRET),
            ("grant_type", "authorization_code"),
            ("redirect_uri", h.instagram_redirect().as_str()),
            ("code", code.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"user_id\":17841400000000003"), "{text}");
    assert!(text.contains("\"permissions\":[\"instagram_business_basic\"]"), "{text}");
}

#[tokio::test]
async fn instagram_wrapped_shape_and_multipart() {
    let h = start().await;
    h.control("/instagram/scenario", json!({ "token_shape": "wrapped" })).await;
    let code = h.instagram_code("17841400000000003").await;
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.unwrap();
    assert_eq!(tokens.account_id.as_deref(), Some("17841400000000003"));
    let profile = h.instagram.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!(profile.username.as_deref(), Some("sandbox.creator"));

    // The documented multipart form, with the wrapped answer.
    let code = h.instagram_code("17841400000000001").await;
    let redirect = h.instagram_redirect();
    let fields = [
        ("client_id", INSTAGRAM_CLIENT_ID),
        ("client_secret", INSTAGRAM_CLIENT_SECRET),
        ("grant_type", "authorization_code"),
        ("redirect_uri", redirect.as_str()),
        ("code", code.as_str()),
    ];
    let mut body = String::new();
    for (k, v) in fields {
        body.push_str(&format!("--BoUnDaRy\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"));
    }
    body.push_str("--BoUnDaRy--\r\n");
    let resp = h
        .http
        .post(format!("{}/sandbox/instagram/oauth/access_token", h.base))
        .header("content-type", "multipart/form-data; boundary=BoUnDaRy")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["data"][0]["user_id"], "17841400000000001");
    assert_eq!(json["data"][0]["permissions"], "instagram_business_basic");
}

#[tokio::test]
async fn instagram_partial_grant_and_scopes() {
    let h = start().await;
    let mut url = h.instagram_authorize_url("s");
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().filter(|(k, _)| k != "scope").collect();
    url.query_pairs_mut().clear().extend_pairs(pairs).append_pair(
        "scope",
        "instagram_business_basic,instagram_business_content_publish,instagram_business_manage_comments",
    );
    let cb = h
        .consent(
            &url,
            &[
                ("decision", "allow"),
                ("granted", "instagram_business_basic"),
                ("granted", "instagram_business_manage_comments"),
            ],
        )
        .await;
    let tokens =
        h.instagram.exchange_code(&cb.query["code"], &h.instagram_redirect(), h.now()).await.unwrap();
    assert_eq!(tokens.scopes, vec!["instagram_business_basic", "instagram_business_manage_comments"]);
}

#[tokio::test]
async fn instagram_personal_accounts_are_refused() {
    let h = start().await;
    let code = h.instagram_code("17841400000000005").await;
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.unwrap();
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    let ProviderError::Rejected { reason } = err else { panic!("{err:?}") };
    assert!(reason.starts_with("personal accounts cannot be connected"), "{reason}");
}

#[tokio::test]
async fn instagram_deny_and_authorize_errors() {
    let h = start().await;
    let url = h.instagram_authorize_url("st");
    let cb = h.consent(&url, &[("decision", "deny")]).await;
    assert_eq!(cb.query["error"], "access_denied");
    assert_eq!(cb.query["error_reason"], "user_denied");
    assert_eq!(cb.query["state"], "st");
    assert!(cb.query.contains_key("error_description"));

    h.control("/instagram/scenario", json!({ "deny_all": true })).await;
    let cb = h.consent(&url, &[("decision", "allow")]).await;
    assert_eq!(cb.query["error_reason"], "user_denied");

    let mut bad = url.clone();
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().filter(|(k, _)| k != "scope").collect();
    bad.query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair("scope", "instagram_business_content_publish");
    let resp = h.http.get(bad).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("<code>scope</code>"));
}

#[tokio::test]
async fn instagram_code_reuse_and_expiry() {
    let h = start().await;
    let redirect = h.instagram_redirect();
    let code = h.instagram_code("17841400000000001").await;
    h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap();
    let err = h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap_err();
    let ProviderError::Permanent { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("Matching code was not found or was already used"), "{reason}");
    assert!(!reason.contains(&code));

    let code = h.instagram_code("17841400000000001").await;
    h.control("/clock/advance", json!({ "seconds": 3601 })).await;
    assert!(matches!(
        h.instagram.exchange_code(&code, &redirect, h.now()).await,
        Err(ProviderError::Permanent { .. })
    ));

    let code = h.instagram_code("17841400000000001").await;
    let err = h.instagram.exchange_code(&code, &format!("{redirect}/"), h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Misconfigured { .. }), "{err:?}");

    // A short-lived token that expired before the long-lived exchange: Graph 190.
    let code = h.instagram_code("17841400000000001").await;
    let short: Value = h
        .http
        .post(format!("{}/sandbox/instagram/oauth/access_token", h.base))
        .form(&[
            ("client_id", INSTAGRAM_CLIENT_ID),
            ("client_secret", INSTAGRAM_CLIENT_SECRET),
            ("grant_type", "authorization_code"),
            ("redirect_uri", redirect.as_str()),
            ("code", code.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    h.control("/clock/advance", json!({ "seconds": 3601 })).await;
    let resp = h
        .http
        .get(format!("{}/sandbox/instagram/graph/access_token", h.base))
        .query(&[
            ("grant_type", "ig_exchange_token"),
            ("client_secret", INSTAGRAM_CLIENT_SECRET),
            ("access_token", short["access_token"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], 190);
    assert_eq!(body["error"]["error_subcode"], 463);

    let stats = h.stats("instagram").await;
    assert_eq!(stats["token_calls"], 5);
    assert_eq!(stats["invalid_grant"], 3);
}

#[tokio::test]
async fn instagram_account_revocation_reports_the_reason() {
    let h = start().await;
    let code = h.instagram_code("17841400000000001").await;
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.unwrap();
    let (status, body) = h.control("/instagram/accounts/17841400000000001/revoke", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["revoked_tokens"], 2, "the short-lived and the long-lived token");
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    let ProviderError::Permanent { reason } = err else { panic!("{err:?}") };
    assert!(reason.contains("removed the app"), "{reason}");

    let code = h.instagram_code("17841400000000003").await;
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.unwrap();
    h.control("/instagram/accounts/17841400000000003/revoke", json!({ "reason": "password_changed" })).await;
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    let ProviderError::Permanent { reason } = err else { panic!("{err:?}") };
    assert!(reason.contains("password"), "{reason}");
}

#[tokio::test]
async fn instagram_request_faults_and_unconfirmed_shapes() {
    let h = start().await;
    let redirect = h.instagram_redirect();
    let account = INSTAGRAM_ACCOUNTS[0].user_id.to_string();
    let (status, scenario) = h
        .control(
            "/instagram/scenario",
            json!({ "me_shape": "wrapped", "error_state": "omit", "fail_next": [
                { "endpoint": "authorize", "kind": "request_error", "parameter": "scope" },
                { "endpoint": "token", "kind": "invalid_client" },
                { "endpoint": "token", "kind": "redirect_uri_mismatch" },
                { "endpoint": "profile", "kind": "graph_rate_limit", "status": 403, "code": 17 },
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{scenario}");
    let resp = h.http.get(h.instagram_authorize_url("st")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("<code>scope</code>"));

    let code = h.instagram_code(&account).await;
    let err = h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap_err();
    let ProviderError::Misconfigured { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("client secret"), "{reason}");
    let err = h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap_err();
    let ProviderError::Misconfigured { reason } = &err else { panic!("{err:?}") };
    assert!(reason.contains("redirect_uri"), "{reason}");
    let err = h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "spent: {err:?}");

    let code = h.instagram_code(&account).await;
    let tokens = h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap();
    // Graph rate limits come as 403 with code 17 too.
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // `/me` wrapped in `data`: the same profile.
    let wire = h
        .http
        .get(format!("{}/sandbox/instagram/graph/v23.0/me?fields=user_id,username", h.base))
        .bearer_auth(tokens.access_token.expose_secret())
        .send()
        .await
        .unwrap();
    let body: Value = wire.json().await.unwrap();
    assert_eq!(body["data"][0]["username"], INSTAGRAM_ACCOUNTS[0].username, "{body}");
    let profile = h.instagram.fetch_profile(&tokens.access_token).await.unwrap();
    assert_eq!(profile.username.as_deref(), Some(INSTAGRAM_ACCOUNTS[0].username));
    assert_eq!(profile.account_id, account);

    let cb =
        h.consent(&h.instagram_authorize_url("st"), &[("decision", "deny"), ("account", &account)]).await;
    assert_eq!(cb.query.get("error_reason").map(String::as_str), Some("user_denied"));
    assert!(!cb.query.contains_key("state"), "{}", cb.location);
}

#[tokio::test]
async fn control_api_refuses_failures_that_cannot_happen_there() {
    let h = start().await;
    for (provider, entry) in [
        ("instagram", json!({ "endpoint": "token", "kind": "pkce_mismatch" })),
        ("tiktok", json!({ "endpoint": "token", "kind": "request_error" })),
        ("tiktok", json!({ "endpoint": "authorize", "kind": "server_error" })),
        ("tiktok", json!({ "endpoint": "profile", "kind": "invalid_client" })),
        ("instagram", json!({ "endpoint": "refresh", "kind": "invalid_client" })),
        ("tiktok", json!({ "endpoint": "token", "kind": "redirect_uri_mismatch", "parameter": "scope" })),
        ("tiktok", json!({ "endpoint": "authorize", "kind": "request_error", "parameter": "state" })),
        (
            "instagram",
            json!({ "endpoint": "authorize", "kind": "request_error", "parameter": "code_challenge" }),
        ),
        ("tiktok", json!({ "endpoint": "profile", "kind": "graph_rate_limit", "code": 17 })),
        ("instagram", json!({ "endpoint": "profile", "kind": "graph_rate_limit", "code": 5 })),
        ("instagram", json!({ "endpoint": "profile", "kind": "graph_rate_limit", "status": 500 })),
        ("instagram", json!({ "endpoint": "profile", "kind": "server_error", "status": 502 })),
        ("instagram", json!({ "endpoint": "profile", "kind": "server_error", "code": 3 })),
        ("instagram", json!({ "endpoint": "token", "kind": "server_error", "code": 1 })),
        ("instagram", json!({ "endpoint": "token", "kind": "server_error", "status": 400 })),
        ("tiktok", json!({ "endpoint": "profile", "kind": "server_error", "code": 1 })),
        ("tiktok", json!({ "endpoint": "exchange_long_lived", "kind": "server_error" })),
        ("instagram", json!({ "endpoint": "revoke", "kind": "server_error" })),
        ("instagram", json!({ "endpoint": "refresh", "kind": "slow_answer" })),
        ("tiktok", json!({ "endpoint": "profile", "kind": "slow_answer" })),
    ] {
        let (status, body) =
            h.control(&format!("/{provider}/scenario"), json!({ "fail_next": [entry] })).await;
        assert_eq!(status, 400, "{provider} {entry}: {body}");
        assert!(body["error"].is_string());
    }
    assert!(h.sandbox.scenario(Platform::Tiktok).fail_next.is_empty(), "nothing was queued");
    for (provider, patch) in [
        ("tiktok", json!({ "me_shape": "wrapped" })),
        ("tiktok", json!({ "signing_secret": "meta" })),
        ("instagram", json!({ "oauth_error_status": "ok" })),
        ("instagram", json!({ "api_error_shape": "flat" })),
    ] {
        let (status, body) = h.control(&format!("/{provider}/scenario"), patch.clone()).await;
        assert_eq!(status, 400, "{provider} {patch}: {body}");
    }
    // The clock moves a hundred years at most (further, every time would overflow).
    let before = h.sandbox.now();
    let (status, body) = h.control("/clock/advance", json!({ "seconds": 300_000_000_000_i64 })).await;
    assert_eq!(status, 400, "{body}");
    assert!(h.sandbox.now() - before < time::Duration::hours(1), "the clock did not move");
}

#[tokio::test]
async fn instagram_scripted_failures_are_classified() {
    let h = start().await;
    h.control(
        "/instagram/scenario",
        json!({ "fail_next": [
            { "endpoint": "token", "kind": "invalid_grant" },
            { "endpoint": "exchange_long_lived", "kind": "rate_limit" },
            { "endpoint": "exchange_long_lived", "kind": "server_error" },
            { "endpoint": "profile", "kind": "graph_rate_limit" },
            { "endpoint": "profile", "kind": "scope_not_authorized" },
            { "endpoint": "profile", "kind": "html_error" },
            { "endpoint": "profile", "kind": "access_token_invalid" },
            { "endpoint": "refresh", "kind": "server_error" },
        ]}),
    )
    .await;
    let redirect = h.instagram_redirect();
    let code = h.instagram_code("17841400000000001").await;
    assert!(matches!(
        h.instagram.exchange_code(&code, &redirect, h.now()).await,
        Err(ProviderError::Permanent { .. })
    ));
    // The code survived the scripted failure; the long-lived step fails next.
    let err = h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap_err();
    let ProviderError::Transient { retry_after, .. } = err else { panic!("{err:?}") };
    assert_eq!(retry_after, Some(Duration::from_secs(30)));
    let code = h.instagram_code("17841400000000001").await;
    assert!(h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap_err().is_transient());
    let code = h.instagram_code("17841400000000001").await;
    let tokens = h.instagram.exchange_code(&code, &redirect, h.now()).await.unwrap();

    let token = &tokens.access_token;
    assert!(h.instagram.fetch_profile(token).await.unwrap_err().is_transient());
    assert!(matches!(h.instagram.fetch_profile(token).await, Err(ProviderError::Scope { .. })));
    assert!(h.instagram.fetch_profile(token).await.unwrap_err().is_transient());
    assert!(matches!(h.instagram.fetch_profile(token).await, Err(ProviderError::Permanent { .. })));
    assert!(h.instagram.fetch_profile(token).await.is_ok());
    assert!(h.instagram.refresh(token, h.now()).await.unwrap_err().is_transient());
}

/// Scripts one failure of `kind` on Instagram's code exchange and runs the adapter's exchange.
async fn instagram_exchange_failing(h: &Harness, code: &str, kind: &str) -> ProviderError {
    let (status, _) = h
        .control("/instagram/scenario", json!({ "fail_next": [{ "endpoint": "token", "kind": kind }] }))
        .await;
    assert_eq!(status, 200);
    h.instagram.exchange_code(code, &h.instagram_redirect(), h.now()).await.unwrap_err()
}

#[tokio::test]
async fn instagram_exchange_failures_answer_the_exchange_shape() {
    let h = start().await;
    let url = format!("{}/sandbox/instagram/oauth/access_token", h.base);
    for (kind, status, error_type) in [
        ("rate_limit", 429, "OAuthRateLimitException"),
        ("graph_rate_limit", 400, "OAuthRateLimitException"),
        ("server_error", 500, "OAuthException"),
        ("temporarily_unavailable", 503, "OAuthException"),
        ("scope_not_authorized", 400, "OAuthPermissionsException"),
        ("scope_permission_missed", 400, "OAuthPermissionsException"),
        ("invalid_grant", 400, "OAuthException"),
        ("access_token_invalid", 400, "OAuthException"),
    ] {
        h.control("/instagram/scenario", json!({ "fail_next": [{ "endpoint": "token", "kind": kind }] }))
            .await;
        let resp = h.http.post(&url).form(&[("client_id", INSTAGRAM_CLIENT_ID)]).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{kind}");
        let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(retry_after.as_deref(), (kind == "rate_limit").then_some("30"), "{kind}");
        let body: Value = resp.json().await.unwrap();
        let mut keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["code", "error_message", "error_type"], "{kind}: {body}");
        assert_eq!(body["error_type"], error_type, "{kind}");
        assert!(body["code"].is_u64() && body["error_message"].is_string(), "{kind}: {body}");
    }

    // The adapter classifies each of them; a scripted failure leaves the code usable.
    let code = h.instagram_code("17841400000000001").await;
    let ProviderError::Transient { retry_after, .. } =
        instagram_exchange_failing(&h, &code, "rate_limit").await
    else {
        panic!("rate_limit")
    };
    assert_eq!(retry_after, Some(Duration::from_secs(30)));
    for kind in ["graph_rate_limit", "server_error", "temporarily_unavailable", "html_error"] {
        let err = instagram_exchange_failing(&h, &code, kind).await;
        assert!(err.is_transient(), "{kind}: {err:?}");
    }
    for kind in ["scope_not_authorized", "scope_permission_missed"] {
        let err = instagram_exchange_failing(&h, &code, kind).await;
        assert!(matches!(err, ProviderError::Scope { .. }), "{kind}: {err:?}");
    }
    let err = instagram_exchange_failing(&h, &code, "invalid_grant").await;
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");
    assert!(h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.is_ok());
}

#[tokio::test]
async fn tiktok_temporarily_unavailable_and_scope_permission_missed_are_classified() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let redirect = h.tiktok_redirect();
    // The wire shape on the token endpoint: an OAuth error with a 503.
    h.control(
        "/tiktok/scenario",
        json!({ "fail_next": [{ "endpoint": "token", "kind": "temporarily_unavailable" }] }),
    )
    .await;
    let resp = h
        .http
        .post(format!("{}/sandbox/tiktok/v2/oauth/token/", h.base))
        .form(&[("grant_type", "authorization_code")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(body["error_description"].is_string() && body["log_id"].is_string());

    h.control(
        "/tiktok/scenario",
        json!({ "fail_next": [
            { "endpoint": "token", "kind": "temporarily_unavailable" },
            { "endpoint": "profile", "kind": "scope_permission_missed", "count": 2 },
            { "endpoint": "profile", "kind": "scope_permission_missed" },
            { "endpoint": "refresh", "kind": "temporarily_unavailable" },
        ]}),
    )
    .await;
    let code = h.tiktok_code(&verifier).await;
    let exchange = || h.tiktok.exchange_code(&code, &verifier, &redirect, h.now());
    assert!(exchange().await.unwrap_err().is_transient());
    let tokens = exchange().await.unwrap();

    // Both the full and the basic field sets refused: a scope failure.
    assert!(matches!(h.tiktok.fetch_profile(&tokens.access_token).await, Err(ProviderError::Scope { .. })));
    // Only the full set refused: the basic fields still give a profile.
    let basic = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap();
    assert!(basic.username.is_none());
    assert!(h.tiktok.fetch_profile(&tokens.access_token).await.unwrap().username.is_some());

    let rt = tokens.refresh_token.unwrap();
    assert!(h.tiktok.refresh(&rt, h.now()).await.unwrap_err().is_transient());
    assert!(h.tiktok.refresh(&rt, h.now()).await.is_ok());

    // What an endpoint never sends cannot be scripted on it: the user-info API's codes on the
    // OAuth endpoints, the OAuth endpoints' `temporarily_unavailable` on user info (§2.2, §2.8).
    for (endpoint, kind) in [
        ("token", "scope_permission_missed"),
        ("refresh", "scope_not_authorized"),
        ("revoke", "scope_permission_missed"),
        ("profile", "temporarily_unavailable"),
    ] {
        let (status, body) = h
            .control("/tiktok/scenario", json!({ "fail_next": [{ "endpoint": endpoint, "kind": kind }] }))
            .await;
        assert_eq!(status, 400, "{endpoint} {kind}: {body}");
    }

    // On Instagram's Graph endpoints: code 2 (transient) and code 200 (a permission).
    h.control(
        "/instagram/scenario",
        json!({ "fail_next": [
            { "endpoint": "profile", "kind": "temporarily_unavailable" },
            { "endpoint": "profile", "kind": "scope_permission_missed" },
        ]}),
    )
    .await;
    let ig_code = h.instagram_code("17841400000000001").await;
    let ig = h.instagram.exchange_code(&ig_code, &h.instagram_redirect(), h.now()).await.unwrap();
    assert!(h.instagram.fetch_profile(&ig.access_token).await.unwrap_err().is_transient());
    assert!(matches!(h.instagram.fetch_profile(&ig.access_token).await, Err(ProviderError::Scope { .. })));
    assert!(h.instagram.fetch_profile(&ig.access_token).await.is_ok());
}

/// The three shapes a TikTok user-info error may take (§2.8): nested with `data: {}`, nested
/// without `data`, flat as the docs print it. The adapter reads each the same way.
#[tokio::test]
async fn tiktok_user_info_errors_in_every_shape() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    let url = "/sandbox/tiktok/v2/user/info/?fields=open_id";
    for shape in ["nested", "nested_no_data", "flat"] {
        let (status, scenario) = h
            .control(
                "/tiktok/scenario",
                json!({ "api_error_shape": shape, "fail_next": [
                    { "endpoint": "profile", "kind": "rate_limit" },
                    { "endpoint": "profile", "kind": "access_token_invalid", "count": 2 },
                ]}),
            )
            .await;
        assert_eq!(status, 200, "{scenario}");
        assert_eq!(scenario["api_error_shape"], shape);
        // On the wire: where the error struct sits, and whether `data` is there.
        let (status, body) = h.get_json(url, &tokens.access_token).await;
        assert_eq!(status, 429);
        let error = if shape == "flat" { &body } else { &body["error"] };
        assert_eq!(error["code"], "rate_limit_exceeded", "{shape}: {body}");
        assert!(error["message"].is_string() && error["log_id"].is_string(), "{shape}: {body}");
        assert_eq!(body.get("data").is_some(), shape == "nested", "{shape}: {body}");
        assert_eq!(body.get("error").is_some(), shape != "flat", "{shape}: {body}");
        // The adapter reads a dead token as such, whatever the shape.
        let err = h.tiktok.fetch_profile(&tokens.access_token).await.unwrap_err();
        assert!(matches!(err, ProviderError::AccessTokenInvalid { .. }), "{shape}: {err:?}");
        assert_eq!(h.get_json(url, &tokens.access_token).await.0, 401);
        assert!(h.tiktok.fetch_profile(&tokens.access_token).await.is_ok(), "{shape}");
    }
    // The handler's own errors follow the switch too: a field that does not exist.
    let (status, body) =
        h.get_json("/sandbox/tiktok/v2/user/info/?fields=open_id,no_such_field", &tokens.access_token).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "invalid_params", "{body}");
}

/// Graph codes 1 and 2 are transient (§3.7), with or without `is_transient`, on any status.
#[tokio::test]
async fn instagram_graph_codes_1_and_2_are_transient() {
    let h = start().await;
    let code = h.instagram_code("17841400000000001").await;
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.unwrap();
    h.control(
        "/instagram/scenario",
        json!({ "fail_next": [
            { "endpoint": "profile", "kind": "server_error", "code": 1, "status": 400 },
            { "endpoint": "profile", "kind": "server_error", "code": 1, "status": 400 },
            { "endpoint": "profile", "kind": "server_error", "code": 2, "status": 503 },
        ]}),
    )
    .await;
    let (status, body) =
        h.get_json("/sandbox/instagram/graph/v23.0/me?fields=user_id,username", &tokens.access_token).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], 1, "{body}");
    assert_eq!(body["error"]["type"], "OAuthException", "{body}");
    assert!(body["error"].get("is_transient").is_none(), "{body}");
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    assert!(err.is_transient(), "code 1 on a 400: {err:?}");
    let err = h.instagram.fetch_profile(&tokens.access_token).await.unwrap_err();
    assert!(err.is_transient(), "code 2 on a 503: {err:?}");
    assert!(h.instagram.fetch_profile(&tokens.access_token).await.is_ok());
}

#[tokio::test]
async fn instagram_refresh_too_early_answer_is_a_switch() {
    let h = start().await;
    let code = h.instagram_code("17841400000000001").await;
    let tokens = h.instagram.exchange_code(&code, &h.instagram_redirect(), h.now()).await.unwrap();
    let url = format!("{}/sandbox/instagram/graph/refresh_access_token", h.base);
    let raw = || async {
        let resp = h
            .http
            .get(&url)
            .query(&[
                ("grant_type", "ig_refresh_token"),
                ("access_token", tokens.access_token.expose_secret()),
            ])
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    // The default: a request error, code 100.
    assert_eq!(h.sandbox.scenario(Platform::Instagram).refresh_too_early, TooEarly::Code100);
    let (status, body) = raw().await;
    assert_eq!((status, body["error"]["code"].as_u64()), (400, Some(100)), "{body}");
    let err = h.instagram.refresh(&tokens.access_token, h.now()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Rejected { .. }), "{err:?}");
    // Code 190, as for a dead token; the token still works all the same.
    let (status, _) = h.control("/instagram/scenario", json!({ "refresh_too_early": "code_190" })).await;
    assert_eq!(status, 200);
    let (status, body) = raw().await;
    assert_eq!((status, body["error"]["code"].as_u64()), (400, Some(190)), "{body}");
    assert!(body["error"].get("error_subcode").is_none(), "{body}");
    assert!(h.instagram.fetch_profile(&tokens.access_token).await.is_ok());
    // The minimum age is a switch too (documented: 24 h).
    h.control("/instagram/scenario", json!({ "refresh_min_age_secs": 3600 })).await;
    h.control("/clock/advance", json!({ "seconds": 3601 })).await;
    assert!(h.instagram.refresh(&tokens.access_token, h.now()).await.is_ok());
    h.control("/instagram/reset", json!({})).await;
    assert_eq!(h.sandbox.scenario(Platform::Instagram).refresh_min_age_secs, 86_400);
    // They are Instagram's.
    let (status, body) = h.control("/tiktok/scenario", json!({ "refresh_too_early": "code_190" })).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = h.control("/tiktok/scenario", json!({ "refresh_min_age_secs": 1 })).await;
    assert_eq!(status, 400);
}

// ---------------------------------------------------------------------------------------------
// The control API.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn control_api_validates_and_resets() {
    let h = start().await;
    let (status, _) = h.control("/myspace/scenario", json!({})).await;
    assert_eq!(status, 404);
    let (status, body) = h.control("/tiktok/scenario", json!({ "deny_everything": true })).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("deny_everything"));
    let (status, _) = h.control("/tiktok/scenario", json!({ "token_shape": "wrapped" })).await;
    assert_eq!(status, 400);
    let (status, _) = h.control("/instagram/scenario", json!({ "pkce_optional": true })).await;
    assert_eq!(status, 400);
    let (status, _) = h
        .control("/tiktok/scenario", json!({ "fail_next": [{ "endpoint": "token", "kind": "explode" }] }))
        .await;
    assert_eq!(status, 400);
    let (status, _) = h.control("/clock/advance", json!({ "seconds": -5 })).await;
    assert_eq!(status, 400);

    let before = h.now();
    let (status, body) = h.control("/clock/advance", json!({ "seconds": 3600 })).await;
    assert_eq!(status, 200);
    assert!(body["now_unix"].as_i64().unwrap() >= before.unix_timestamp() + 3600);

    h.control("/tiktok/scenario", json!({ "deny_all": true, "lifetimes": "short" })).await;
    h.http.get(h.tiktok_authorize_url(&pkce::new_verifier(), "s")).send().await.unwrap();
    assert_eq!(h.stats("tiktok").await["authorize_requests"], 1);
    let (status, _) = h.control("/tiktok/reset", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(h.stats("tiktok").await["authorize_requests"], 0);
    assert_eq!(h.sandbox.scenario(Platform::Tiktok), Scenario::default());

    let accounts: Value = h
        .http
        .get(format!("{}/sandbox/control/instagram/accounts", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(accounts["accounts"][2]["account_type"], "PERSONAL");
}

#[tokio::test]
async fn debug_output_holds_no_tokens() {
    let h = start().await;
    let verifier = pkce::new_verifier();
    let code = h.tiktok_code(&verifier).await;
    let tokens = h.tiktok.exchange_code(&code, &verifier, &h.tiktok_redirect(), h.now()).await.unwrap();
    let debug = format!("{:?} {:?} {:?}", h.sandbox, h.tiktok, tokens);
    assert!(!debug.contains(tokens.access_token.expose_secret()), "{debug}");
    assert!(!debug.contains(tokens.refresh_token.as_ref().unwrap().expose_secret()), "{debug}");
    assert!(!debug.contains(&code), "{debug}");
    assert!(!debug.contains(TIKTOK_CLIENT_SECRET), "{debug}");
}

#[tokio::test]
async fn control_api_is_absent_unless_enabled() {
    let h = start_with(false, &[]).await;
    assert!(!h.sandbox.control_api_enabled());
    let (status, _) = h.control("/tiktok/scenario", json!({ "deny_all": true })).await;
    assert_eq!(status, 404);
    // The simulated providers are still there.
    let resp = h.http.get(h.tiktok_authorize_url(&pkce::new_verifier(), "s")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = h.http.get(format!("{}/sandbox/avatars/sandbox-creator.svg", h.base)).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "image/svg+xml");
}

/// A held call waits until released (or its limit), is counted while it waits, and is no longer
/// counted once its caller has gone away mid-wait.
#[tokio::test]
async fn held_calls_wait_for_their_release_and_are_counted_while_they_wait() {
    let h = start().await;
    let held = || h.sandbox.stats(Platform::Tiktok).held;
    let until_held = async || {
        tokio::time::timeout(Duration::from_secs(10), async {
            while held() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the call is held");
    };
    let limit = Duration::from_secs(60);
    let sandbox = Arc::clone(&h.sandbox);
    let call = tokio::spawn(async move { sandbox.hold(Platform::Tiktok, limit).await });
    until_held().await;
    assert_eq!(h.sandbox.stats(Platform::Instagram).held, 0, "another provider's calls are its own");
    assert_eq!(h.sandbox.release(Platform::Tiktok), 1);
    tokio::time::timeout(Duration::from_secs(10), call).await.expect("released").unwrap();
    assert_eq!(held(), 0);
    // A caller that stops waiting is not counted any more.
    let sandbox = Arc::clone(&h.sandbox);
    let gone = tokio::spawn(async move { sandbox.hold(Platform::Tiktok, limit).await });
    until_held().await;
    gone.abort();
    let _ = gone.await;
    assert_eq!(held(), 0);
    // With nothing held, a release lets nothing go.
    assert_eq!(h.sandbox.release(Platform::Tiktok), 0);
}
