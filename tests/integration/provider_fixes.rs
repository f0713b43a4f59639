//! Provider rules end to end: live mode needs its credentials, a refused TikTok access token gets
//! one refresh before the grant is judged, and an Instagram token is never refreshed (nor counted
//! as failing) before the provider allows it.

use serde_json::{Value, json};

use crate::connect::connect;
use crate::health::eventually;
use crate::helpers::TestApp;
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    tests![
        live_mode_without_its_credentials_is_refused,
        health_check_refreshes_a_refused_tiktok_access_token,
        health_check_breaks_when_the_refreshed_token_is_refused_too,
        forced_refresh_of_a_young_instagram_token_asks_nothing,
        instagram_refusing_a_refresh_of_a_working_token_is_not_a_failure,
    ]
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The id of the workspace's connection to `account_id`.
async fn connection_of(app: &TestApp, key: &str, account_id: &str) -> String {
    let list = app.api_get("/connections", key, 200).await;
    let found = list["data"].as_array().unwrap().iter().find(|c| c["provider_account_id"] == account_id);
    found.unwrap_or_else(|| panic!("no connection to {account_id}: {list}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The kinds of a connection's history.
fn event_kinds(detail: &Value) -> Vec<String> {
    detail["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect()
}

async fn live_mode_without_its_credentials_is_refused(app: TestApp) {
    // `sandbox = false` and no credentials: both keys are named.
    let out = app.cli_env(&["config", "check"], &[("AUTHLINK_PROVIDERS__TIKTOK__SANDBOX", "false")]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("`providers.tiktok.client_key` and `providers.tiktok.client_secret`: are missing"),
        "{err}"
    );
    // Half of the credentials, without any `sandbox` setting: the missing one is named, and the
    // value that was set is not shown.
    let out = app.cli_env(
        &["config", "check"],
        &[("AUTHLINK_PROVIDERS__INSTAGRAM__CLIENT_SECRET", "ig-secret-value")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("`providers.instagram.client_id`: is missing"), "{err}");
    assert!(!err.contains("ig-secret-value"), "{err}");
    // `serve` refuses to start the same way.
    let out = app.cli_env(
        &["serve"],
        &[("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "ck"), ("AUTHLINK_LISTEN", "127.0.0.1:0")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`providers.tiktok.client_secret`: is missing"), "{}", stderr(&out));
    // Both credentials run live; `sandbox = true` simulates whatever is set; nothing set is the
    // sandbox.
    let live = app.cli_env(
        &["config", "check", "--json"],
        &[
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "ck"),
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET", "cs"),
        ],
    );
    assert!(live.status.success(), "{}", stderr(&live));
    let live: Value = serde_json::from_slice(&live.stdout).unwrap();
    assert_eq!(live["providers"]["tiktok"]["mode"], "live");
    let forced = app.cli_env(
        &["config", "check", "--json"],
        &[("AUTHLINK_PROVIDERS__TIKTOK__SANDBOX", "true"), ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "ck")],
    );
    assert!(forced.status.success(), "{}", stderr(&forced));
    let forced: Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(forced["providers"]["tiktok"]["mode"], "sandbox");
    assert_eq!(app.cli_json(&["config", "check"])["providers"]["instagram"]["mode"], "sandbox");
}

async fn health_check_refreshes_a_refused_tiktok_access_token(app: TestApp) {
    let wid = app.workspace("Refused tokens");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let acct = authlink::sandbox::TIKTOK_ACCOUNTS[0];
    connect(&app.client, &app, &url, "tiktok", acct.open_id).await;
    let id = connection_of(&app, &key, acct.open_id).await;
    let before = app.api_get(&format!("/connections/{id}"), &key, 200).await;

    // TikTok kills the access token alone; the refresh token lives on.
    let killed =
        app.sandbox(&format!("/tiktok/accounts/{}/revoke-access-tokens", acct.open_id), json!({})).await;
    assert_eq!(killed["revoked_tokens"], 1);
    let stats_before = app.sandbox_stats("tiktok").await;
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "refreshed", "{out}");
    assert_eq!(out["connection"]["status"], "active");
    let stats = app.sandbox_stats("tiktok").await;
    let calls = |s: &Value, k: &str| s[k].as_u64().unwrap();
    assert_eq!(calls(&stats, "refresh_calls") - calls(&stats_before, "refresh_calls"), 1, "one refresh");
    assert_eq!(calls(&stats, "profile_calls") - calls(&stats_before, "profile_calls"), 2, "asked again");
    let after = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_ne!(after["last_refreshed_at"], before["last_refreshed_at"]);
    assert!(after["last_checked_at"].is_string());
    assert_eq!(after["refresh_failures"], 0);
    // The new token works: the next check is a plain one.
    let out = app.cli_json(&["connection", "check", &id]);
    assert_eq!(out["outcome"], "current");
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_token_reuse"], 0);

    // The access token is refused and the refresh is unavailable for now: no verdict yet.
    app.sandbox(&format!("/tiktok/accounts/{}/revoke-access-tokens", acct.open_id), json!({})).await;
    app.sandbox(
        "/tiktok/scenario",
        json!({ "fail_next": [{ "endpoint": "refresh", "kind": "temporarily_unavailable" }] }),
    )
    .await;
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "transient", "{out}");
    assert_eq!(out["connection"]["status"], "active");
    // Once the provider is back, the next check refreshes and the connection is fine.
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "refreshed", "{out}");
    assert_eq!(out["connection"]["status"], "active");
}

async fn health_check_breaks_when_the_refreshed_token_is_refused_too(app: TestApp) {
    let wid = app.workspace("Refused twice");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let [first, second, ..] = authlink::sandbox::TIKTOK_ACCOUNTS;
    connect(&app.client, &app, &url, "tiktok", first.open_id).await;
    connect(&app.client, &app, &url, "tiktok", second.open_id).await;

    // The token a refresh brings is refused too: now the grant is judged dead.
    let id = connection_of(&app, &key, first.open_id).await;
    app.sandbox(
        "/tiktok/scenario",
        json!({ "fail_next": [{ "endpoint": "profile", "kind": "access_token_invalid", "count": 2 }] }),
    )
    .await;
    let refreshes = app.sandbox_stats("tiktok").await["refresh_calls"].as_u64().unwrap();
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "broken", "{out}");
    let reason = out["detail"].as_str().unwrap();
    assert!(reason.contains("health check") && reason.contains("refresh"), "{reason}");
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"].as_u64().unwrap(), refreshes + 1);
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "broken");
    assert!(c["repair_url"].is_string());

    // The user removed the app: the access token is refused, then the refresh is refused
    // (invalid_grant): broken, with both reasons.
    let id = connection_of(&app, &key, second.open_id).await;
    app.sandbox(&format!("/tiktok/accounts/{}/revoke", second.open_id), json!({})).await;
    let out = app.cli(&["connection", "check", &id]);
    assert!(stdout(&out).contains("broken"), "{}", stdout(&out));
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "broken");
    let reason = c["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("health check")
            && reason.contains("access_token_invalid")
            && reason.contains("invalid_grant"),
        "{reason}"
    );
}

async fn forced_refresh_of_a_young_instagram_token_asks_nothing(app: TestApp) {
    let wid = app.workspace("Young IG");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let acct = authlink::sandbox::INSTAGRAM_ACCOUNTS[0].user_id.to_string();
    connect(&app.client, &app, &url, "instagram", &acct).await;
    let id = connection_of(&app, &key, &acct).await;
    let before = app.api_get(&format!("/connections/{id}"), &key, 200).await;

    // Forced refreshes of a token under 24 hours old, more than the failure threshold: none
    // reaches Instagram, none counts as a failure, the token is unchanged.
    for _ in 0..4 {
        let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
        assert_eq!(out["outcome"], "too_early", "{out}");
        let detail = out["detail"].as_str().unwrap();
        assert!(detail.contains("24 hours") && detail.contains("unchanged"), "{detail}");
        assert_eq!(out["connection"]["status"], "active");
    }
    let out = app.cli(&["connection", "refresh", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("too_early: "), "{}", stdout(&out));
    assert_eq!(app.cli_json(&["connection", "refresh", &id])["outcome"], "too_early");
    assert_eq!(app.sandbox_stats("instagram").await["refresh_calls"], 0);
    let after = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    for field in ["access_token_expires_at", "last_refreshed_at", "next_refresh_at", "refresh_failures"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert!(!event_kinds(&after).contains(&"refresh_failed".into()), "{after}");
    // The audit log still records who asked.
    let audit = app.cli_json(&["audit", "list", "--action", "connection.refresh_requested"]);
    assert_eq!(audit.as_array().unwrap().len(), 6);

    // Past 24 hours, a forced refresh reaches Instagram.
    app.advance_clock(24 * 3600 + 60).await;
    let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "refreshed", "{out}");
    assert_eq!(app.sandbox_stats("instagram").await["refresh_calls"], 1);
    // And the new token is young again.
    let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "too_early", "{out}");
    assert_eq!(app.sandbox_stats("instagram").await["refresh_calls"], 1);
}

async fn instagram_refusing_a_refresh_of_a_working_token_is_not_a_failure(app: TestApp) {
    let wid = app.workspace("Strict IG");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let acct = authlink::sandbox::INSTAGRAM_ACCOUNTS[1].user_id.to_string();
    connect(&app.client, &app, &url, "instagram", &acct).await;
    let id = connection_of(&app, &key, &acct).await;
    let before = app.api_get(&format!("/connections/{id}"), &key, 200).await;

    // Instagram turns out stricter than its docs (48 h), and says so with code 190, as for a
    // dead token, then with the default code 100: the token still works, so neither breaks the
    // connection nor counts as a failure.
    app.sandbox(
        "/instagram/scenario",
        json!({ "refresh_min_age_secs": 48 * 3600, "refresh_too_early": "code_190" }),
    )
    .await;
    app.advance_clock(25 * 3600).await;
    for round in 0..4 {
        if round == 3 {
            app.sandbox("/instagram/scenario", json!({ "refresh_too_early": "code_100" })).await;
        }
        let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
        assert_eq!(out["outcome"], "too_early", "round {round}: {out}");
        assert!(out["detail"].as_str().unwrap().contains("still works"), "{out}");
        assert_eq!(out["connection"]["status"], "active");
        assert_eq!(out["connection"]["refresh_failures"], 0);
    }
    assert_eq!(app.sandbox_stats("instagram").await["refresh_calls"], 4);
    let after = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(after["access_token_expires_at"], before["access_token_expires_at"]);
    assert!(!event_kinds(&after).contains(&"refresh_failed".into()), "{after}");
    // The scheduler tries again within hours, and succeeds once Instagram allows it.
    assert_ne!(after["next_refresh_at"], before["next_refresh_at"]);
    app.advance_clock(24 * 3600).await;
    eventually("the scheduler's refresh", 30, || async {
        let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
        (c["access_token_expires_at"] != before["access_token_expires_at"]).then_some(c)
    })
    .await;
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!((c["status"].as_str(), c["refresh_failures"].as_i64()), (Some("active"), Some(0)));

    // A token that is really dead (Meta's callback lost) still breaks the connection on a refusal.
    app.sandbox(&format!("/instagram/accounts/{acct}/revoke"), json!({"notify": false})).await;
    app.advance_clock(49 * 3600).await;
    let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "broken", "{out}");
    assert_eq!(app.api_get(&format!("/connections/{id}"), &key, 200).await["status"], "broken");
}
