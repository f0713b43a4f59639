//! The sandbox's switches for the failures providers.md §9.1 lists and the behaviours it marks
//! unconfirmed, each driven through the whole connect flow: what the client sees, what the
//! operator is told, and that nothing is written by a failed attempt.

use serde_json::{Value, json};

use crate::connect::{
    assert_nothing_connected, connect, consent, finish, new_browser, start, start_and_consent,
};
use crate::helpers::{TestApp, token_of};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    tests![
        refused_code_exchanges_fail_the_flow_and_tell_the_operator,
        authorize_page_errors_leave_nothing_behind,
        denial_without_state_still_leads_back_to_the_link,
        provider_errors_on_the_callback_end_the_flow,
        unconfirmed_answer_shapes_are_tolerated,
        unconfirmed_refresh_rotation_and_exchange_ids_are_tolerated,
        a_personal_instagram_account_is_never_connected,
        meta_callbacks_signed_with_either_secret,
        control_api_takes_only_json,
    ]
}

fn account(provider: &str) -> String {
    match provider {
        "tiktok" => authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id.to_string(),
        _ => authlink::sandbox::INSTAGRAM_ACCOUNTS[0].user_id.to_string(),
    }
}

/// A wrong client secret, a redirect URI that differs: the client gets "cannot be made right
/// now" (502), told to tell the agency rather than to try again (nothing the client does changes
/// it), and the agency the attempt as a setup error. A PKCE verifier that does not match is no
/// setting of the operator's: "could not finish connecting" (502) with a way back. The operator
/// gets an error line naming what to check for the first, a warning for the second, and the code
/// appears in no log line.
async fn refused_code_exchanges_fail_the_flow_and_tell_the_operator(app: TestApp) {
    let wid = app.workspace("Refused");
    let key = app.workspace_key(&wid);
    let (link_id, url) = app.link(&wid, "Client");
    let try_again = format!("href=\"/l/{}\"", token_of(&url));
    let cases = [
        ("tiktok", "invalid_client", true),
        ("tiktok", "redirect_uri_mismatch", true),
        ("tiktok", "pkce_mismatch", false),
        ("instagram", "invalid_client", true),
        ("instagram", "redirect_uri_mismatch", true),
    ];
    // (`refusals_logged`: the refusals logged by the cases before.)
    for (refusals_logged, (provider, kind, setup)) in cases.into_iter().enumerate() {
        app.sandbox(
            &format!("/{provider}/scenario"),
            json!({"fail_next": [{"endpoint": "token", "kind": kind}]}),
        )
        .await;
        let flow =
            start_and_consent(&app.client, &app, &url, provider, &account(provider), "allow", None).await;
        let page = finish(&app.client, &app, &flow.callback).await;
        assert_eq!(page.status(), 502, "{provider} {kind}");
        let html = page.text().await.unwrap();
        let title =
            if setup { "This connection cannot be made right now" } else { "We could not finish connecting" };
        assert!(html.contains(title), "{provider} {kind}: {html}");
        assert_eq!(
            html.contains("Please tell the agency that sent you the link"),
            setup,
            "{provider} {kind}: {html}"
        );
        assert!(html.contains("Nothing was connected"), "{provider} {kind}");
        assert_eq!(html.contains(&try_again), !setup, "{provider} {kind}: a way back unless it cannot help");
        let tried = app.api_get(&format!("/links/{link_id}/attempts?limit=1"), &key, 200).await;
        let outcome = if setup { "exchange_refused" } else { "exchange_failed" };
        assert_eq!(tried["data"][0]["outcome"], outcome, "{provider} {kind}: {tried}");
        assert_eq!(tried["data"][0]["provider"], provider);
        let needle = "the provider refused the code exchange";
        let line = app.wait_for_another_log_line(needle, refusals_logged, 10).await;
        if setup {
            assert!(line.contains("\"level\":\"ERROR\""), "{line}");
            assert!(
                line.contains(&format!("/oauth/{provider}/callback")),
                "names the callback to register: {line}"
            );
        } else {
            assert!(line.contains("\"level\":\"WARN\"") && line.contains("for this attempt"), "{line}");
        }
        let code = url::Url::parse(&flow.callback)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        crate::helpers::assert_nowhere(&app, "authorization code", &code).await;
        // Nor the client secret the refused exchange carried (the log lines name the refusal).
        let secret = match provider {
            "tiktok" => authlink::sandbox::TIKTOK_CLIENT_SECRET,
            _ => authlink::sandbox::INSTAGRAM_CLIENT_SECRET,
        };
        assert!(!app.log_text().contains(secret), "{provider} {kind}: the logs hold the client secret");
        assert_eq!(
            app.sandbox_stats(provider).await["profile_calls"],
            0,
            "{provider} {kind}: no profile call"
        );
        assert_nothing_connected(&app).await;
    }
}

/// The provider's authorize page refuses the request (no redirect back): the client sees the
/// provider's page, nothing is written, and the next attempt from the link works.
async fn authorize_page_errors_leave_nothing_behind(app: TestApp) {
    let wid = app.workspace("Authorize");
    let (_, url) = app.link(&wid, "Client");
    for (provider, parameter) in
        [("tiktok", "redirect_uri"), ("tiktok", "code_challenge"), ("instagram", "client_id")]
    {
        app.sandbox(
            &format!("/{provider}/scenario"),
            json!({"fail_next": [{"endpoint": "authorize", "kind": "request_error", "parameter": parameter}]}),
        )
        .await;
        let before = app.count("connections").await;
        let authorize = start(&app.client, &app, &url, provider).await;
        let page = app.client.get(&authorize).send().await.unwrap();
        assert_eq!(page.status(), 400, "{provider} {parameter}");
        assert!(page.headers().get("location").is_none(), "no redirect back");
        let html = page.text().await.unwrap();
        assert!(html.contains(&format!("<code>{parameter}</code>")), "{provider} {parameter}: {html}");
        if before == 0 {
            assert_nothing_connected(&app).await;
        }
        // The client goes back and presses the button again: the same authorize URL now works.
        let flow = consent(&app.client, &app, &authorize, provider, &account(provider), "allow", None).await;
        assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), 200, "{provider} {parameter}");
    }
    assert_eq!(app.count("connections").await, 2, "one account of each provider");
}

/// Whether the providers send `state` back with an error is undocumented. Without it, the denial
/// page still leads back to the link in the browser that started the flow, and nowhere else.
async fn denial_without_state_still_leads_back_to_the_link(app: TestApp) {
    let wid = app.workspace("No state");
    let (_, url) = app.link(&wid, "Client");
    let try_again = format!("href=\"/l/{}\"", token_of(&url));
    for provider in ["tiktok", "instagram"] {
        app.sandbox(&format!("/{provider}/scenario"), json!({"error_state": "omit"})).await;
        let flow =
            start_and_consent(&app.client, &app, &url, provider, &account(provider), "deny", None).await;
        assert!(flow.callback.contains("error=access_denied"), "{}", flow.callback);
        assert!(!flow.callback.contains("state="), "{}", flow.callback);
        let page = finish(&app.client, &app, &flow.callback).await;
        assert_eq!(page.status(), 403, "{provider}");
        let html = page.text().await.unwrap();
        assert!(html.contains("Connection cancelled"), "{provider}: {html}");
        assert!(html.contains(&try_again), "{provider}: try again leads back to the link: {html}");
        // Another browser opening the same answer learns nothing about the link.
        let other = finish(&new_browser(), &app, &flow.callback).await;
        assert_eq!(other.status(), 403);
        let html = other.text().await.unwrap();
        assert!(html.contains("Connection cancelled") && !html.contains("/l/"), "{provider}: {html}");
        assert_eq!(app.sandbox_stats(provider).await["token_calls"], 0, "{provider}");
    }
    // With the switch on, a success still carries its state and connects.
    connect(&app.client, &app, &url, "tiktok", &account("tiktok")).await;
    assert_eq!(app.count("connections").await, 1);
}

/// TikTok redirecting back with an error other than a denial (§2.2), with its state or without,
/// with no code exchanged and nothing connected: a passing problem of TikTok's leads back to the
/// link; a refusal of the authorize request itself (our scopes, our client key) tells the client
/// to tell the agency, and the operator what to check; another error is "the platform reported
/// a problem". The agency's list of attempts names the error when the state came back.
async fn provider_errors_on_the_callback_end_the_flow(app: TestApp) {
    let wid = app.workspace("Callback errors");
    let key = app.workspace_key(&wid);
    let (link_id, url) = app.link(&wid, "Client");
    let try_again = format!("href=\"/l/{}\"", token_of(&url));
    // (error, whether the state comes back, the page's title, whether trying again can help)
    let cases = [
        ("temporarily_unavailable", "echo", "The platform has a passing problem", true),
        ("server_error", "omit", "The platform has a passing problem", true),
        ("invalid_scope", "echo", "This connection cannot be made right now", false),
        ("unauthorized_client", "omit", "This connection cannot be made right now", false),
        ("invalid_grant", "echo", "The platform reported a problem", true),
    ];
    for (error, error_state, title, retry) in cases {
        app.sandbox(
            "/tiktok/scenario",
            json!({"error_state": error_state,
                   "fail_next": [{"endpoint": "authorize", "kind": "callback_error", "error": error}]}),
        )
        .await;
        let authorize = start(&app.client, &app, &url, "tiktok").await;
        let res = app.client.get(&authorize).send().await.unwrap();
        assert_eq!(res.status(), 302, "{error}: no consent screen");
        let callback = res.headers()["location"].to_str().unwrap().to_string();
        assert!(callback.contains(&format!("error={error}")), "{callback}");
        assert_eq!(callback.contains("state="), error_state == "echo", "{callback}");
        let page = finish(&app.client, &app, &callback).await;
        // Whatever the provider sends back to the callback gets a 4xx (security.md O11).
        assert_eq!(page.status(), 400, "{error}");
        let html = page.text().await.unwrap();
        assert!(html.contains(title), "{error}: {html}");
        assert_eq!(html.contains(&try_again), retry, "{error}: a way back unless it cannot help: {html}");
        if !retry && error_state == "echo" {
            app.wait_for_log("the provider refused the authorization request", 10).await;
            let log = app.log_text();
            let line = log
                .lines()
                .rev()
                .find(|l| l.contains("the provider refused the authorization request"))
                .unwrap();
            assert!(line.contains("\"level\":\"ERROR\"") && line.contains(error), "{line}");
            assert!(line.contains("/oauth/tiktok/callback"), "names the callback to register: {line}");
        }
        let tried = app.api_get(&format!("/links/{link_id}/attempts?limit=1"), &key, 200).await;
        let attempt = &tried["data"][0];
        if error_state == "echo" {
            // The attempt ends as the provider said, for the agency to see.
            assert_eq!(attempt["status"], "failed", "{error}: {tried}");
            assert_eq!(attempt["detail"], error, "{error}: {tried}");
            let reference = attempt["reference"].as_str().unwrap();
            assert!(html.contains(&format!("Reference: {reference}.")), "{error}: {html}");
        } else {
            // Without its state the answer may come from any page that sent this browser here:
            // it ends nothing (the client may still be at the provider), and a setup error is
            // told to the operator as a possibility only.
            assert_eq!(attempt["status"], "in_progress", "{error}: {tried}");
            if !retry {
                app.wait_for_log("came back without a state", 10).await;
                let log = app.log_text();
                let line = log.lines().rev().find(|l| l.contains("came back without a state")).unwrap();
                assert!(line.contains("\"level\":\"WARN\"") && line.contains(error), "{line}");
            }
        }
    }
    // The same answer sent by anyone else (no cookie of the flow's browser) ends no attempt and
    // tells the operator nothing.
    let told = |log: String| {
        (
            log.matches("the provider refused the authorization request").count(),
            log.matches("names a setup problem").count(),
        )
    };
    let told_before = told(app.log_text());
    let stranger = new_browser();
    let page = finish(&stranger, &app, &app.url("/oauth/tiktok/callback?error=invalid_client")).await;
    assert_eq!(page.status(), 400);
    let flow = start(&app.client, &app, &url, "tiktok").await;
    let state =
        url::Url::parse(&flow).unwrap().query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let forged = format!("/oauth/tiktok/callback?error=invalid_client&state={state}");
    assert_eq!(finish(&stranger, &app, &app.url(&forged)).await.status(), 400);
    let tried = app.api_get(&format!("/links/{link_id}/attempts?limit=1"), &key, 200).await;
    assert_eq!(tried["data"][0]["status"], "in_progress", "{tried}");
    app.logs_caught_up().await;
    assert_eq!(told(app.log_text()), told_before);
    assert_eq!(app.sandbox_stats("tiktok").await["token_calls"], 0);
    assert_eq!(app.count("connections").await, 0);
    // The sandbox refuses what TikTok does not send: another error value, or Instagram.
    for (provider, entry) in [
        ("tiktok", json!({"endpoint": "authorize", "kind": "callback_error", "error": "access_denied"})),
        ("tiktok", json!({"endpoint": "token", "kind": "callback_error"})),
        ("instagram", json!({"endpoint": "authorize", "kind": "callback_error"})),
    ] {
        let res = app
            .client
            .post(app.url(&format!("/sandbox/control/{provider}/scenario")))
            .json(&json!({"fail_next": [entry]}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{provider}: {entry}");
    }
}

/// TikTok errors on a 200, Instagram's `/me` wrapped in `data`, Graph rate limits as 403 with
/// code 17: the flow reads each as the provider means it.
async fn unconfirmed_answer_shapes_are_tolerated(app: TestApp) {
    let wid = app.workspace("Shapes");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    // TikTok answering its OAuth errors with 200: a dead code is still a refused exchange, a
    // rate limit still "try again later", and a good code still connects.
    app.sandbox(
        "/tiktok/scenario",
        json!({"oauth_error_status": "ok", "fail_next": [
            {"endpoint": "token", "kind": "invalid_grant"},
            {"endpoint": "token", "kind": "rate_limit"},
        ]}),
    )
    .await;
    for status in [502, 504] {
        let flow =
            start_and_consent(&app.client, &app, &url, "tiktok", &account("tiktok"), "allow", None).await;
        assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), status);
    }
    assert_nothing_connected(&app).await;
    connect(&app.client, &app, &url, "tiktok", &account("tiktok")).await;
    // Instagram: a rate limit as 403 with code 17 is transient (504), and `/me` wrapped in
    // `data` gives the same account.
    app.sandbox(
        "/instagram/scenario",
        json!({"me_shape": "wrapped", "fail_next": [
            {"endpoint": "profile", "kind": "graph_rate_limit", "status": 403, "code": 17},
        ]}),
    )
    .await;
    let flow =
        start_and_consent(&app.client, &app, &url, "instagram", &account("instagram"), "allow", None).await;
    assert_eq!(finish(&app.client, &app, &flow.callback).await.status(), 504);
    let html = connect(&app.client, &app, &url, "instagram", &account("instagram")).await;
    let ig = &authlink::sandbox::INSTAGRAM_ACCOUNTS[0];
    assert!(html.contains(ig.username), "{html}");
    let list = app.api_get("/connections?provider=instagram", &key, 200).await;
    let conn = &list["data"][0];
    assert_eq!(conn["provider_account_id"], ig.user_id.to_string(), "{list}");
    assert_eq!(conn["username"], ig.username);
    assert_eq!(app.count("connections").await, 2);
}

/// Whether TikTok rotates refresh tokens (newer docs) or keeps them, and which id Instagram's code
/// exchange names (the professional or the app-scoped one), are unconfirmed: refreshes go on
/// working whichever the provider does (a refresh token kept when none comes back, the new one
/// stored when one does), and an Instagram account is one connection whichever id the exchange
/// names, keyed on `/me`'s `user_id`.
async fn unconfirmed_refresh_rotation_and_exchange_ids_are_tolerated(app: TestApp) {
    let wid = app.workspace("Rotation");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", &account("tiktok")).await;
    let id = app.api_get("/connections?provider=tiktok", &key, 200).await["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut last =
        app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await["access_token"].clone();
    for rotation in ["omit", "keep", "rotate", "omit"] {
        app.sandbox("/tiktok/scenario", json!({"refresh_rotation": rotation})).await;
        for round in 0..2 {
            let res = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
            assert_eq!(res["outcome"], "refreshed", "{rotation} {round}: {res}");
            let token = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
            assert_ne!(token["access_token"], last, "{rotation} {round}: the new access token is stored");
            last = token["access_token"].clone();
        }
    }
    let stats = app.sandbox_stats("tiktok").await;
    assert_eq!(stats["refresh_calls"], 8, "{stats}");
    assert_eq!(stats["invalid_grant"], 0, "no refresh sent a dead refresh token: {stats}");
    assert_eq!(stats["refresh_token_reuse"], 0, "{stats}");
    let conn = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(conn["status"], "active", "{conn}");
    // Instagram: the exchange names the app-scoped id, then the professional one: one connection,
    // keyed on the professional account's id, reconnected the second time.
    let ig = &authlink::sandbox::INSTAGRAM_ACCOUNTS[0];
    for (round, named) in ["app_scoped", "professional"].into_iter().enumerate() {
        app.sandbox("/instagram/scenario", json!({"exchange_user_id": named})).await;
        connect(&app.client, &app, &url, "instagram", &account("instagram")).await;
        let list = app.api_get("/connections?provider=instagram", &key, 200).await;
        let conns = list["data"].as_array().unwrap();
        assert_eq!(conns.len(), 1, "{named}: {list}");
        assert_eq!(conns[0]["provider_account_id"], ig.user_id.to_string(), "{named}: {list}");
        assert_eq!(conns[0]["reconnect_count"], round, "{named}: {list}");
    }
}

/// What Instagram does with a personal account's login is unconfirmed: refused on its own page
/// (no code: the attempt never comes back), or let through with `/me` saying `PERSONAL`, which
/// authlink refuses with a page that says what to do. Either way nothing is connected.
async fn a_personal_instagram_account_is_never_connected(app: TestApp) {
    let wid = app.workspace("Personal");
    let (_, url) = app.link(&wid, "Client");
    let acct = authlink::sandbox::INSTAGRAM_ACCOUNTS[0];
    let user_id = acct.user_id.to_string();
    app.sandbox(&format!("/instagram/accounts/{user_id}/account-type"), json!({"account_type": "PERSONAL"}))
        .await;
    // Refused at login: the consent page answers with Instagram's own error page, no redirect.
    app.sandbox("/instagram/scenario", json!({"personal_account": "refuse_login"})).await;
    let authorize = start(&app.client, &app, &url, "instagram").await;
    let parsed = url::Url::parse(&authorize).unwrap();
    let mut form: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    form.push(("account".into(), user_id.clone()));
    form.push(("decision".into(), "allow".into()));
    let mut post_url = parsed.clone();
    post_url.set_query(None);
    let answer = app.client.post(post_url.as_str()).form(&form).send().await.unwrap();
    assert_eq!(answer.status(), 400);
    assert!(answer.headers().get("location").is_none());
    assert!(answer.text().await.unwrap().contains("This is a personal account"));
    assert_eq!(app.sandbox_stats("instagram").await["token_calls"], 0, "no code was issued");
    // Let through: authlink reads the account type and refuses it.
    app.sandbox("/instagram/scenario", json!({"personal_account": "allow"})).await;
    let flow = start_and_consent(&app.client, &app, &url, "instagram", &user_id, "allow", None).await;
    let page = finish(&app.client, &app, &flow.callback).await;
    assert_eq!(page.status(), 403);
    assert!(page.text().await.unwrap().contains("Only professional (business or creator) accounts"));
    assert_nothing_connected(&app).await;
}

/// Which secret Meta signs its callbacks with for an Instagram-Login app is unconfirmed: signed
/// with either the Instagram app secret or the Meta app secret, both callbacks are honoured, and
/// the data-deletion answer is the one Meta checks.
async fn meta_callbacks_signed_with_either_secret(app: TestApp) {
    let wid = app.workspace("Meta secrets");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let a = &authlink::sandbox::INSTAGRAM_ACCOUNTS[0];
    for secret in ["meta", "instagram"] {
        app.sandbox("/instagram/scenario", json!({"signing_secret": secret})).await;
        connect(&app.client, &app, &url, "instagram", &a.user_id.to_string()).await;
        let list = app.api_get("/connections", &key, 200).await;
        let id = list["data"][0]["id"].as_str().unwrap().to_string();
        assert_eq!(list["data"][0]["status"], "active");
        // The user removes the app: Meta's deauthorize callback breaks the connection.
        let answer = app.sandbox(&format!("/instagram/accounts/{}/revoke", a.user_id), json!({})).await;
        assert_eq!(answer["deauthorize_callback"], 200, "{secret}: {answer}");
        let broken = app.api_get(&format!("/connections/{id}"), &key, 200).await;
        assert_eq!(broken["status"], "broken", "{secret}");
        // The client reconnects, then asks Meta to delete their data.
        connect(&app.client, &app, &url, "instagram", &a.user_id.to_string()).await;
        let answer: Value =
            app.sandbox(&format!("/instagram/accounts/{}/data-deletion", a.user_id), json!({})).await;
        assert_eq!(answer["status"], 200, "{secret}: {answer}");
        assert_eq!(answer["valid"], true, "{secret}: the answer Meta checks: {answer}");
        assert_eq!(answer["status_page"], 200, "{secret}: {answer}");
        let code = answer["confirmation_code"].as_str().unwrap();
        assert!(answer["url"].as_str().unwrap().ends_with(code), "{answer}");
        let erased = app.api_get(&format!("/connections/{id}"), &key, 200).await;
        assert_eq!(erased["status"], "broken", "{secret}");
        assert!(erased["username"].is_null(), "{secret}: profile data erased: {erased}");
    }
    // A request signed with neither secret changes nothing.
    let res = app
        .client
        .post(app.url("/oauth/instagram/data-deletion"))
        .form(&[("signed_request", "c2ln.eyJ1c2VyX2lkIjoiMSJ9")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // Unknown accounts are refused by the control API.
    let res = app
        .client
        .post(app.url("/sandbox/control/instagram/accounts/1/data-deletion"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

/// The control API changes nothing for a post that is not JSON (a form, plain text, no body:
/// what another site's page can make a browser send, to move the clock of an instance on a
/// developer's machine, say): 415.
async fn control_api_takes_only_json(app: TestApp) {
    let send = |request: reqwest::RequestBuilder| async move { request.send().await.unwrap() };
    let url = app.url("/sandbox/control/clock/advance");
    for refused in [
        app.client.post(&url).body(r#"{"seconds": 3600}"#),
        app.client.post(&url).header("content-type", "text/plain").body(r#"{"seconds": 3600}"#),
        app.client.post(&url).form(&[("seconds", "3600")]),
        app.client.post(app.url("/sandbox/control/tiktok/reset")),
    ] {
        let res = send(refused).await;
        assert_eq!(res.status(), 415);
        assert!(res.text().await.unwrap().contains("application/json"));
    }
    let res = send(
        app.client
            .post(&url)
            .header("content-type", "Application/JSON; charset=utf-8")
            .body(r#"{"seconds": 0}"#),
    )
    .await;
    assert_eq!(res.status(), 200, "JSON, whatever its spelling");
}
