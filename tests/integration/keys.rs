//! Master key rotation (security scenario 15): a new master key with the old one decrypt-only,
//! a re-wrap of every sealed value over 10,000 links and every other kind of secret, the old
//! key's retirement, and a restart with the new key alone.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::connect::{connect, consent, finish, start};
use crate::health::{Receiver, eventually, verify_with_standardwebhooks};
use crate::helpers::{TestApp, new_master_key};
use crate::tests;

/// Links sealed under the old key (the scenario's 10,000 rows; other secrets come on top).
const LINKS: usize = 10_000;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    tests![
        master_key_rotation_rewraps_every_secret,
        sealed_values_are_bound_to_their_workspace,
        a_key_a_running_process_seals_with_is_not_retired,
        a_refresh_under_way_through_a_rewrap_brings_back_no_retired_key
    ]
}

/// Every link of the workspace: id → URL (the URL holds the link's token, unsealed to show it).
async fn all_links(app: &TestApp, key: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/links?limit=200&cursor={c}"),
            None => "/links?limit=200".to_string(),
        };
        let page = app.api_get(&path, key, 200).await;
        for l in page["data"].as_array().unwrap() {
            out.insert(l["id"].as_str().unwrap().to_string(), l["url"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Creates `n` links through the API, 16 at a time.
async fn create_links(app: &TestApp, key: &str, n: usize) {
    let mut next = 0;
    while next < n {
        let batch: Vec<_> = (next..n.min(next + 16))
            .map(|i| {
                let req = app
                    .api(reqwest::Method::POST, "/links", key)
                    .json(&json!({"label": format!("Client {i}")}));
                async move {
                    let res = req.send().await.unwrap();
                    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
                }
            })
            .collect();
        next += batch.len();
        futures::future::join_all(batch).await;
    }
}

/// Sealed values by key id, from `authlink keys status`.
fn sealed_by_kid(status: &Value) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for c in status["sealed"].as_array().unwrap() {
        *out.entry(c["kid"].as_str().unwrap().to_string()).or_default() += c["count"].as_i64().unwrap();
    }
    out
}

fn key_state<'a>(status: &'a Value, kid: &str) -> &'a Value {
    status["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid).unwrap()
}

async fn master_key_rotation_rewraps_every_secret(app: TestApp) {
    // The links are made through the API as fast as it answers: past the default limit per key.
    let (app, cleanup_fast) =
        app.restart_with(&[("AUTHLINK_HTTP__API_REQUESTS_PER_MINUTE", "1000000")]).await;
    let wid = app.workspace("Rotation");
    let key = app.workspace_key(&wid);
    // Under the first key: a webhook endpoint with a current and a previous secret, a connected
    // account (access and refresh token, event payloads), a flow waiting at the consent screen
    // (its PKCE verifier), and 10,000 links.
    let receiver = Receiver::start().await;
    let created = app
        .api_post("/webhooks", &key, json!({"url": receiver.url, "events": ["connection.created"]}), 201)
        .await;
    let endpoint = created["id"].as_str().unwrap().to_string();
    let first_secret = created["secret"].as_str().unwrap().to_string();
    let rotated = app.api_post(&format!("/webhooks/{endpoint}/rotate-secret"), &key, json!({}), 200).await;
    let secret = rotated["secret"].as_str().unwrap().to_string();
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id).await;
    receiver.wait_for(1, 20).await;
    let connection =
        app.api_get("/connections", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    let token_path = format!("/connections/{connection}/access-token");
    let access_token = app.api_get(&token_path, &key, 200).await["access_token"].clone();
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let authorize = start(&browser, &app, &url, "tiktok").await;
    let started = std::time::Instant::now();
    create_links(&app, &key, LINKS - 1).await;
    eprintln!("keys: {} links created in {:?}", LINKS - 1, started.elapsed());
    let links = all_links(&app, &key).await;
    assert_eq!(links.len(), LINKS);

    let before = app.cli_json(&["keys", "status"]);
    let old_kid = before["active_kid"].as_str().unwrap().to_string();
    let old_values = sealed_by_kid(&before);
    assert_eq!(old_values.keys().collect::<Vec<_>>(), [&old_kid]);
    // links, the connection's two tokens, the endpoint's two secrets, the event, and the verifier
    // of the attempt still open (the one that ended erased its own)
    let old_count = old_values[&old_kid];
    assert!(old_count >= LINKS as i64 + 6, "{before}");

    // A new key alone cannot open the data: refused, naming the stored key.
    let old_key = app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1.clone();
    let new_key = new_master_key();
    let refused = app.cli_env(&["keys", "status"], &[("AUTHLINK_MASTER_KEY", &new_key)]);
    assert_eq!(refused.status.code(), Some(2));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("does not match") && message.contains(&old_kid), "{message}");

    // Rotate: the new key seals, the old one only opens.
    let (app, cleanup) = app
        .restart_with(&[("AUTHLINK_MASTER_KEY", &new_key), ("AUTHLINK_RETIRED_MASTER_KEYS", &old_key)])
        .await;
    let status = app.cli_json(&["keys", "status"]);
    let new_kid = status["active_kid"].as_str().unwrap().to_string();
    assert_ne!(new_kid, old_kid);
    assert_eq!(key_state(&status, &old_kid)["configured"], "decrypt-only");
    assert_eq!(key_state(&status, &new_kid)["configured"], "active");
    // Old values still open, new ones are sealed with the new key: the flow begun under the old
    // key completes and connects a second account (the sandbox's consent is given now: its codes
    // live in the memory of the process that issued them).
    let flow = consent(
        &browser,
        &app,
        &authorize,
        "tiktok",
        authlink::sandbox::TIKTOK_ACCOUNTS[1].open_id,
        "allow",
        None,
    )
    .await;
    let page = finish(&browser, &app, &flow.callback).await;
    assert_eq!(page.status(), 200, "{}", page.text().await.unwrap());
    assert_eq!(app.api_get(&token_path, &key, 200).await["access_token"], access_token);
    let sealed = sealed_by_kid(&app.cli_json(&["keys", "status"]));
    assert!(sealed[&new_kid] >= 2);
    // The attempt's verifier, sealed with the old key, was erased when it ended.
    assert_eq!(sealed[&old_kid], old_count - 1);
    let old_count = sealed[&old_kid];

    // Dropping the old key before the re-wrap is refused: values still need it.
    let early = app.cli_env(&["keys", "status"], &[("AUTHLINK_RETIRED_MASTER_KEYS", "[]")]);
    assert_eq!(early.status.code(), Some(2));
    let message = String::from_utf8_lossy(&early.stderr);
    assert!(message.contains(&old_kid) && message.contains("keys rewrap"), "{message}");

    // A value moved from another row cannot be opened: the re-wrap reports it, leaves it, and
    // does not retire the old key.
    let ids: Vec<&String> = links.keys().collect();
    let (victim, donor) = (ids[10], ids[11]);
    let original =
        app.text(&format!("SELECT token_sealed FROM {{schema}}.links WHERE id = '{victim}'")).await;
    let moved = app.text(&format!("SELECT token_sealed FROM {{schema}}.links WHERE id = '{donor}'")).await;
    assert_eq!(
        app.execute(&format!("UPDATE {{schema}}.links SET token_sealed = '{moved}' WHERE id = '{victim}'"))
            .await,
        1
    );
    let started = std::time::Instant::now();
    let partial = app.cli(&["keys", "rewrap", "--batch", "700", "--json"]);
    eprintln!("keys: re-wrap of every value in {:?}", started.elapsed());
    assert_eq!(partial.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&partial.stdout).unwrap();
    assert_eq!(report["unreadable"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["unreadable"][0]["id"], victim.as_str());
    assert!(!report["unreadable"][0]["error"].as_str().unwrap().contains("v2:"), "no ciphertext in errors");
    assert_eq!(
        report["remaining"],
        json!([{"table": "links", "column": "token_sealed", "kid": old_kid, "envelope": "v2", "count": 1}])
    );
    assert_eq!(report["retired"], json!([]));
    let resealed: i64 =
        report["columns"].as_array().unwrap().iter().map(|c| c["resealed"].as_i64().unwrap()).sum();
    assert_eq!(resealed, old_count - 1);

    // Put the value back: the next run finishes and retires the old key.
    app.execute(&format!("UPDATE {{schema}}.links SET token_sealed = '{original}' WHERE id = '{victim}'"))
        .await;
    let report = app.cli_json(&["keys", "rewrap", "--batch", "700"]);
    assert_eq!(report["remaining"], json!([]), "{report}");
    assert_eq!(report["retired"], json!([old_kid]));
    let resealed: i64 =
        report["columns"].as_array().unwrap().iter().map(|c| c["resealed"].as_i64().unwrap()).sum();
    assert_eq!(resealed, 1);
    // Nothing under the old key is left anywhere (its key check value aside: it identifies the
    // key should it ever be configured again).
    let dump = app.logical_dump(&["key_checks"]).await;
    assert_eq!(dump.matches(&format!("v2:{old_kid}:")).count(), 0);
    assert!(dump.matches(&format!("v2:{new_kid}:")).count() >= old_count as usize);
    let status = app.cli_json(&["keys", "status"]);
    assert_eq!(sealed_by_kid(&status).keys().collect::<Vec<_>>(), [&new_kid]);
    assert!(key_state(&status, &old_kid)["retired_at"].is_string());

    // A value sealed with the retired key after all (a process still running with the old key
    // wrote it): the new key alone is refused while it is there, not started to lose it.
    let rewrapped =
        app.text(&format!("SELECT token_sealed FROM {{schema}}.links WHERE id = '{victim}'")).await;
    app.execute(&format!("UPDATE {{schema}}.links SET token_sealed = '{original}' WHERE id = '{victim}'"))
        .await;
    let straggler = app.cli_env(&["keys", "status"], &[("AUTHLINK_RETIRED_MASTER_KEYS", "[]")]);
    assert_eq!(straggler.status.code(), Some(2));
    let message = String::from_utf8_lossy(&straggler.stderr);
    assert!(message.contains(&old_kid) && message.contains("keys rewrap"), "{message}");
    app.execute(&format!("UPDATE {{schema}}.links SET token_sealed = '{rewrapped}' WHERE id = '{victim}'"))
        .await;

    // The new key alone now runs, and opens everything: 10,000/10,000 links show their token,
    // the connection's token is the same, both webhook secrets still sign.
    let (app, cleanup_new_only) = app.restart_with(&[("AUTHLINK_RETIRED_MASTER_KEYS", "[]")]).await;
    assert_eq!(all_links(&app, &key).await, links);
    assert_eq!(app.api_get(&token_path, &key, 200).await["access_token"], access_token);
    let landing = app.client.get(links.values().last().unwrap()).send().await.unwrap();
    assert_eq!(landing.status(), 200);
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let test_event = eventually("the test event", 20, || async {
        let got = receiver.got.lock().unwrap().clone();
        got.into_iter()
            .find(|r| r.body.contains("\"webhook.test\""))
            .map(|r| json!({"headers": r.headers, "body": r.body}))
    })
    .await;
    let received = crate::health::Received {
        headers: serde_json::from_value(test_event["headers"].clone()).unwrap(),
        body: test_event["body"].as_str().unwrap().to_string(),
    };
    assert_eq!(received.headers["webhook-signature"].split(' ').count(), 2);
    verify_with_standardwebhooks(&secret, std::slice::from_ref(&received));
    verify_with_standardwebhooks(&first_secret, std::slice::from_ref(&received));
    let audit = app.cli_json(&["audit", "list", "--action", "key.retired"]);
    assert_eq!(audit.as_array().unwrap().len(), 1, "{audit}");
    cleanup_new_only.run().await;
    cleanup.run().await;
    cleanup_fast.run().await;
}

/// A `v1` envelope, as values were sealed before the workspace joined the associated data:
/// written here from the format (XChaCha20-Poly1305; associated data the length-prefixed key
/// id, table, row and column), independently of authlink's sealing code.
fn legacy_envelope(
    master_b64: &str,
    kid: &str,
    plaintext: &str,
    table: &str,
    row: &str,
    column: &str,
) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let key = STANDARD.decode(master_b64).unwrap();
    let cipher = chacha20poly1305::XChaCha20Poly1305::new_from_slice(&key).unwrap();
    let mut aad = Vec::new();
    for part in [kid, table, row, column] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    let nonce: [u8; 24] = rand::random();
    let ct = cipher
        .encrypt(
            chacha20poly1305::XNonce::from_slice(&nonce),
            Payload { msg: plaintext.as_bytes(), aad: &aad },
        )
        .unwrap();
    format!("v1:{kid}:{}:{}", URL_SAFE_NO_PAD.encode(nonce), URL_SAFE_NO_PAD.encode(ct))
}

/// Sealed values are bound to their workspace: a connection moved to another workspace in the
/// database gives that workspace no token. Values sealed before that binding (`v1`) still open,
/// are counted by `keys status`, and `keys rewrap` moves them to the current envelope.
async fn sealed_values_are_bound_to_their_workspace(app: TestApp) {
    let (w1, k1, _, _, connection) = crate::connect::connected_workspace(&app, "Owner").await;
    let w2 = app.workspace("Intruder");
    let k2 = app.workspace_key(&w2);
    let token_path = format!("/connections/{connection}/access-token");
    let token = app.api_get(&token_path, &k1, 200).await["access_token"].as_str().unwrap().to_string();

    // Someone with write access to the database moves the connection to their workspace.
    let moved = format!("UPDATE {{schema}}.connections SET workspace_id = '{w2}' WHERE id = '{connection}'");
    assert_eq!(app.execute(&moved).await, 1);
    let res = app.api(reqwest::Method::GET, &token_path, &k2).send().await.unwrap();
    assert_eq!(res.status(), 500);
    let body = res.text().await.unwrap();
    assert!(!body.contains(&token), "the token is not handed to the other workspace");
    // The refusal is logged.
    app.wait_for_log("failed authentication", 10).await;
    let back = format!("UPDATE {{schema}}.connections SET workspace_id = '{w1}' WHERE id = '{connection}'");
    assert_eq!(app.execute(&back).await, 1);
    assert_eq!(app.api_get(&token_path, &k1, 200).await["access_token"], token.as_str());

    // A value in the earlier envelope, as an older authlink stored it.
    let master = app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1.clone();
    let kid = app.cli_json(&["keys", "status"])["active_kid"].as_str().unwrap().to_string();
    let legacy = legacy_envelope(&master, &kid, "legacy-token", "connections", &connection, "access_token");
    let stored = format!(
        "UPDATE {{schema}}.connections SET access_token_sealed = '{legacy}' WHERE id = '{connection}'"
    );
    assert_eq!(app.execute(&stored).await, 1);
    assert_eq!(app.api_get(&token_path, &k1, 200).await["access_token"], "legacy-token");
    let status = app.cli_json(&["keys", "status"]);
    let legacy_count = |status: &Value| -> i64 {
        status["sealed"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["envelope"] == "v1")
            .map(|c| c["count"].as_i64().unwrap())
            .sum()
    };
    assert_eq!(legacy_count(&status), 1, "{status}");
    let human = String::from_utf8_lossy(&app.cli(&["keys", "status"]).stdout).to_string();
    assert!(human.contains("1 value is in the v1 envelope") && human.contains("keys rewrap"), "{human}");
    let report = app.cli_json(&["keys", "rewrap"]);
    assert_eq!(report["remaining"], json!([]), "{report}");
    let resealed: i64 =
        report["columns"].as_array().unwrap().iter().map(|c| c["resealed"].as_i64().unwrap()).sum();
    assert_eq!(resealed, 1);
    assert_eq!(legacy_count(&app.cli_json(&["keys", "status"])), 0);
    let now_stored = app
        .text(&format!("SELECT access_token_sealed FROM {{schema}}.connections WHERE id = '{connection}'"))
        .await;
    assert!(now_stored.starts_with(&format!("v2:{kid}:")), "{now_stored}");
    assert_eq!(app.api_get(&token_path, &k1, 200).await["access_token"], "legacy-token");
}

/// A re-wrap does not retire a key that a running process still seals with (the values it
/// sealed afterwards would need a key the operator is about to remove). A process stopped
/// cleanly removes its record; one that stopped without saying so holds its key only while its
/// last heartbeat is recent.
async fn a_key_a_running_process_seals_with_is_not_retired(app: TestApp) {
    let wid = app.workspace("Held");
    app.link(&wid, "Client");
    let status = app.cli_json(&["keys", "status"]);
    let old_kid = status["active_kid"].as_str().unwrap().to_string();
    let processes = status["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 1, "{status}");
    assert_eq!(processes[0]["role"], "serve");
    assert_eq!(processes[0]["pid"], app.pid());
    assert_eq!(processes[0]["active_kid"], old_kid.as_str());
    assert_eq!(processes[0]["running"], true);
    // A worker records itself too.
    let mut worker = start_worker(&app);
    let status = app.cli_json(&["keys", "status"]);
    let recorded = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["role"] == "worker" && p["pid"] == worker.id() && p["active_kid"] == old_kid.as_str());
    assert!(recorded, "{status}");

    // The new key is configured and the values re-wrapped, but the server and the worker still
    // run with the old configuration: every value moves, the old key stays.
    let old_key = app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1.clone();
    let new_key = new_master_key();
    let rotated =
        [("AUTHLINK_MASTER_KEY", new_key.as_str()), ("AUTHLINK_RETIRED_MASTER_KEYS", old_key.as_str())];
    let out = app.cli_env(&["keys", "rewrap", "--json"], &rotated);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["remaining"], json!([]), "{report}");
    assert_eq!(report["retired"], json!([]), "{report}");
    assert_eq!(report["held"][0]["kid"], old_kid.as_str(), "{report}");
    let mut holders: Vec<u64> = report["held"][0]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    holders.sort_unstable();
    let mut expected = vec![u64::from(app.pid()), u64::from(worker.id())];
    expected.sort_unstable();
    assert_eq!(holders, expected, "{report}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("restart them"));
    let text = app.cli_env(&["keys", "status"], &rotated);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("seals with {old_kid}")), "{text}");

    // A worker stopped with SIGTERM removes its record; the server still holds the key.
    let _ = std::process::Command::new("kill").args(["-TERM", &worker.id().to_string()]).status();
    assert_eq!(tokio::task::block_in_place(|| worker.wait()).unwrap().code(), Some(0));
    let status = app.cli_json_env(&["keys", "status"], &rotated);
    assert_eq!(status["processes"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["processes"][0]["pid"], app.pid());

    // Stopped cleanly, the server removes its record. A record of a process that stopped without
    // saying so, last seen ten minutes ago, holds nothing: the key is retired.
    assert_eq!(app.stop(), Some(0));
    assert_eq!(app.count("processes").await, 0);
    let stale = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        as i64
        - 600_000;
    app.execute(&format!(
        "INSERT INTO {{schema}}.processes (id, role, host, pid, active_kid, started_at, seen_at) \
         VALUES ('gone', 'worker', 'old-host', 1, '{old_kid}', {stale}, {stale})"
    ))
    .await;
    let out = app.cli_env(&["keys", "rewrap", "--json"], &rotated);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(report["retired"], json!([old_kid]), "{report}");
    assert_eq!(report["held"], json!([]));
}

/// Starts `authlink worker` on the app's database and returns once it says it runs.
fn start_worker(app: &TestApp) -> std::process::Child {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(crate::helpers::binary());
    cmd.arg("worker").current_dir(app.dir.path()).stdout(std::process::Stdio::null());
    crate::helpers::clear_authlink_env(&mut cmd);
    cmd.envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd.env("AUTHLINK_LOG", "info").env("AUTHLINK_LOG_FORMAT", "json").stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let ready = tokio::task::block_in_place(|| {
        lines.by_ref().map_while(Result::ok).any(|l| {
            seen.push(l.clone());
            l.contains("authlink worker running")
        })
    });
    assert!(ready, "the worker exited before it said it runs:\n{}", seen.join("\n"));
    // Keep draining its log, so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

/// A refresh under way while `keys rewrap` runs, whose provider keeps the refresh token (its
/// answer names none): the kept token is stored sealed with the active key. Written back in the
/// envelope read before the call, it would bring back the key the re-wrap had just moved every
/// value off, and retired.
async fn a_refresh_under_way_through_a_rewrap_brings_back_no_retired_key(app: TestApp) {
    use secrecy::ExposeSecret;
    let old_key = app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1.clone();
    let old_kid = app.cli_json(&["keys", "status"])["active_kid"].as_str().unwrap().to_string();
    let new_key = new_master_key();
    // The provider's time limit outlasts the re-wrap that runs while TikTok holds the refresh.
    let (app, restarted) = app
        .restart_with(&[
            ("AUTHLINK_MASTER_KEY", &new_key),
            ("AUTHLINK_RETIRED_MASTER_KEYS", &old_key),
            ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "20"),
        ])
        .await;
    let wid = app.workspace("Kept");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id).await;
    let id = app.api_get("/connections", &key, 200).await["data"][0]["id"].as_str().unwrap().to_string();
    // Its refresh token sealed with the old key, as a value sealed before the rotation is.
    let sealed =
        app.text(&format!("SELECT refresh_token_sealed FROM {{schema}}.connections WHERE id = '{id}'")).await;
    let aad = authlink::crypto::Aad::new(&wid, "connections", &id, "refresh_token");
    let both =
        authlink::crypto::KeyRing::from_base64(&new_key.clone().into(), &[old_key.clone().into()]).unwrap();
    let refresh_token = both.open_str(&sealed, aad).unwrap();
    let old = authlink::crypto::KeyRing::from_base64(&old_key.clone().into(), &[]).unwrap();
    let resealed = old.seal_str(refresh_token.expose_secret(), aad);
    let update =
        format!("UPDATE {{schema}}.connections SET refresh_token_sealed = '{resealed}' WHERE id = '{id}'");
    assert_eq!(app.execute(&update).await, 1);
    assert_eq!(sealed_by_kid(&app.cli_json(&["keys", "status"])).get(&old_kid), Some(&1));

    // A forced refresh reaches TikTok, which holds it there, and will send no refresh token.
    app.sandbox(
        "/tiktok/scenario",
        json!({"refresh_rotation": "omit", "fail_next": [{"endpoint": "refresh", "kind": "hold"}], "slow_ms": 120_000}),
    )
    .await;
    let request =
        app.api(reqwest::Method::POST, &format!("/connections/{id}/refresh"), &key).json(&json!({}));
    let answer = tokio::spawn(async move { request.send().await.unwrap() });
    eventually("the refresh to be held at TikTok", 30, || async {
        let stats = app.sandbox_stats("tiktok").await;
        (stats["held"] == 1).then_some(stats)
    })
    .await;
    // Meanwhile every value moves to the new key, and the old one is retired.
    let report = app.cli_json(&["keys", "rewrap"]);
    assert_eq!(report["remaining"], json!([]), "{report}");
    assert_eq!(report["retired"], json!([old_kid]), "{report}");
    // The refresh goes on and ends: nothing is sealed with the retired key.
    assert_eq!(app.sandbox("/tiktok/release", json!({})).await["released"], 1);
    let refreshed = crate::helpers::expect_json(answer.await.unwrap(), 200).await;
    assert_eq!(refreshed["outcome"], "refreshed", "{refreshed}");
    let status = app.cli_json(&["keys", "status"]);
    assert_eq!(sealed_by_kid(&status).get(&old_kid), None, "{status}");
    // And the kept refresh token is the one the connection had.
    let stored =
        app.text(&format!("SELECT refresh_token_sealed FROM {{schema}}.connections WHERE id = '{id}'")).await;
    assert_eq!(both.open_str(&stored, aad).unwrap().expose_secret(), refresh_token.expose_secret());
    restarted.run().await;
}
