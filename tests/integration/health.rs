//! Connection health: refresh, failure classes, health checks, deauthorization, expiring
//! notices, webhooks (signed per Standard Webhooks, verified by an independent library), and
//! concurrent workers on PostgreSQL.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::connect::connect;
use crate::helpers::{TestApp, binary};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    let mut list = tests![
        webhook_endpoints_are_managed_and_validated,
        private_webhook_targets_are_refused,
        webhooks_are_signed_retried_and_redelivered,
        gone_endpoint_is_disabled,
        transient_refresh_failures_recover,
        refresh_overtaken_by_a_reconnect_keeps_the_new_grant,
        refusal_overtaken_by_a_reconnect_gives_the_new_token,
        refresh_outlives_the_request_that_asked_for_it,
        a_refresh_does_not_revive_a_connection_broken_meanwhile,
        a_check_does_not_run_during_another_process_refresh,
        tokens_go_only_to_the_provider_they_came_from,
        a_token_read_waits_for_another_process_refresh_within_the_request,
        a_token_read_refuses_a_connection_broken_during_its_failed_refresh,
        a_disconnect_holds_the_refresh_lease_while_it_revokes,
        a_disconnect_changes_nothing_while_the_grant_cannot_be_revoked,
        a_broken_connections_grant_is_revoked_with_a_refreshed_token,
        a_reconnect_during_a_disconnect_is_kept,
        an_inactive_connection_leaves_the_refresh_schedule,
        unreadable_tokens_break_the_connection,
        upgrade_to_the_refresh_schedule_keeps_schedules_and_leases,
        permanent_failure_breaks_once_and_link_repairs,
        withdrawn_scopes_are_noticed_at_refresh,
        withheld_scopes_are_noticed_on_a_health_check,
        health_check_catches_revocation,
        instagram_account_switched_to_personal_is_broken_by_a_check,
        instagram_token_is_refreshed_after_a_day,
        instagram_deauthorize_and_data_deletion,
        live_meta_callbacks_take_either_secret,
        expiring_grant_is_announced,
        webhook_cli_commands,
    ];
    list.push((
        "two_workers_refresh_each_connection_once",
        |app| Box::pin(two_workers_refresh_each_connection_once(app)),
        crate::Only::Postgres,
    ));
    list.push((
        "killed_worker_claims_are_taken_over",
        |app| Box::pin(killed_worker_claims_are_taken_over(app)),
        crate::Only::Postgres,
    ));
    list
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// A webhook receiver on loopback that answers from a script of statuses (then 200).
pub struct Receiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Received>>>,
    pub script: Arc<Mutex<VecDeque<u16>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Receiver {
    pub async fn start() -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script: Arc<Mutex<VecDeque<u16>>> = Arc::default();
        let notify = Arc::new(tokio::sync::Notify::new());
        let (g, sc, n) = (got.clone(), script.clone(), notify.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (g, sc, n) = (g.clone(), sc.clone(), n.clone());
                async move {
                    let headers = headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                        .collect();
                    g.lock()
                        .unwrap()
                        .push(Received { headers, body: String::from_utf8_lossy(&body).to_string() });
                    n.notify_waiters();
                    let status = sc.lock().unwrap().pop_front().unwrap_or(200);
                    StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, got, script, notify }
    }

    /// Waits until at least `n` requests arrived (or fails after `secs`).
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        self.wait_until(n, secs, |got| got.len()).await
    }

    /// Waits until at least `n` distinct messages (by `webhook-id`) arrived (or fails after
    /// `secs`). Delivery is at least once: a test that moves the clock past a delivery in flight
    /// lets its claim run out, and the message may come a second time, with the same id.
    pub async fn wait_for_messages(&self, n: usize, secs: u64) -> Vec<Received> {
        self.wait_until(n, secs, |got| distinct(got).len()).await
    }

    async fn wait_until(&self, n: usize, secs: u64, count: impl Fn(&[Received]) -> usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let notified = self.notify.notified();
            {
                let got = self.got.lock().unwrap();
                if count(&got) >= n {
                    return got.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.got.lock().unwrap();
                panic!(
                    "expected {n} webhook requests, got {}: {:?}",
                    count(&got),
                    got.iter().map(|r| r.body.clone()).collect::<Vec<_>>()
                );
            }
        }
    }

    /// The event types of the distinct messages received so far (by `webhook-id`), in the order
    /// they first arrived.
    pub fn types(&self) -> Vec<String> {
        distinct(&self.got.lock().unwrap())
            .iter()
            .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["type"].as_str().unwrap().to_string())
            .collect()
    }
}

/// The first arrival of each message (by `webhook-id`).
fn distinct(got: &[Received]) -> Vec<&Received> {
    let mut seen = std::collections::HashSet::new();
    got.iter().filter(|r| seen.insert(r.headers.get("webhook-id").cloned().unwrap_or_default())).collect()
}

/// Asks for a forced refresh of connection `id` whose provider (TikTok's sandbox) answers
/// `slow_ms` late, and waits until it has reached the provider: its answer, to be awaited.
async fn forced_refresh_in_flight(
    app: &TestApp,
    key: &str,
    id: &str,
    slow_ms: u64,
) -> tokio::task::JoinHandle<reqwest::Response> {
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "slow"}], "slow_ms": slow_ms}),
    )
    .await;
    let calls = app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap();
    let request = app.api(reqwest::Method::POST, &format!("/connections/{id}/refresh"), key).json(&json!({}));
    let answer = tokio::spawn(async move { request.send().await.unwrap() });
    refresh_reached_provider(app, "the forced refresh to reach the provider", calls).await;
    answer
}

/// Asks for a forced refresh of connection `id` and waits until TikTok's sandbox holds it (until
/// [`release`]): its answer, to be awaited once released.
async fn forced_refresh_held(
    app: &TestApp,
    key: &str,
    id: &str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    post_held_at_tiktok(app, key, &format!("/connections/{id}/refresh"), "refresh", 60_000).await
}

/// Posts to the API `path` in a task of its own while TikTok's sandbox holds the next call to
/// `endpoint` (for `slow_ms` at most), and returns once TikTok holds it (until [`release`]).
async fn post_held_at_tiktok(
    app: &TestApp,
    key: &str,
    path: &str,
    endpoint: &str,
    slow_ms: u64,
) -> tokio::task::JoinHandle<reqwest::Response> {
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": endpoint, "kind": "hold"}], "slow_ms": slow_ms}),
    )
    .await;
    let request = app.api(reqwest::Method::POST, path, key).json(&json!({}));
    let answer = tokio::spawn(async move { request.send().await.unwrap() });
    held_at_tiktok(app, &format!("the {endpoint} call to be held at TikTok")).await;
    answer
}

/// Waits until TikTok's sandbox holds a call (a `hold` failure; `what`: which one).
async fn held_at_tiktok(app: &TestApp, what: &str) {
    eventually(what, 30, || async {
        let stats = app.sandbox_stats("tiktok").await;
        (stats["held"] == 1).then_some(stats)
    })
    .await;
}

/// Lets the calls TikTok's sandbox holds go on.
async fn release(app: &TestApp) {
    assert_eq!(app.sandbox("/tiktok/release", json!({})).await["released"], 1);
}

/// Waits until TikTok's sandbox has seen more than `calls` refresh calls (`what`: which one).
async fn refresh_reached_provider(app: &TestApp, what: &str, calls: i64) {
    eventually(what, 30, || async {
        let s = app.sandbox_stats("tiktok").await;
        (s["refresh_calls"].as_i64().unwrap() > calls).then_some(s)
    })
    .await;
}

/// Waits until `cond` holds for the value `probe` produces (state owned by another process).
pub async fn eventually<F, Fut>(what: &str, secs: u64, mut probe: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn add_endpoint(app: &TestApp, key: &str, url: &str, events: Option<Vec<&str>>) -> (String, String) {
    let mut body = json!({"url": url});
    if let Some(e) = events {
        body["events"] = json!(e);
    }
    let created = app.api_post("/webhooks", key, body, 201).await;
    (created["id"].as_str().unwrap().to_string(), created["secret"].as_str().unwrap().to_string())
}

async fn webhook_endpoints_are_managed_and_validated(app: TestApp) {
    let wid = app.workspace("Hooks");
    let key = app.workspace_key(&wid);
    let other = app.workspace_key(&app.workspace("Other"));
    let created = app
        .api_post(
            "/webhooks",
            &key,
            json!({"url": "http://127.0.0.1:9/hook", "events": ["connection.broken"]}),
            201,
        )
        .await;
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    let id = created["id"].as_str().unwrap();
    let listed = app.api_get("/webhooks", &key, 200).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(!listed.to_string().contains(secret), "the secret is shown once");
    assert_eq!(listed[0]["events"], json!(["connection.broken"]));
    for (body, field) in [
        (json!({"url": "not a url"}), "url"),
        (json!({"url": "ftp://example.com/x"}), "url"),
        (json!({"url": "https://user:pw@example.com/"}), "url"),
        (json!({"url": "https://example.com/", "events": ["connection.exploded"]}), "events"),
        (json!({"url": "https://example.com/", "events": []}), "events"),
    ] {
        let p = app.api_post("/webhooks", &key, body.clone(), 422).await;
        assert_eq!(p["errors"][0]["field"], field, "{body}");
    }
    app.api_get(&format!("/webhooks/{id}"), &other, 404).await;
    let off = app.api_patch(&format!("/webhooks/{id}"), &key, json!({"enabled": false}), 200).await;
    assert_eq!(off["enabled"], false);
    // A test event to a disabled endpoint would never be sent: refused.
    let p = app.api_post(&format!("/webhooks/{id}/test"), &key, json!({}), 409).await;
    assert!(p["detail"].as_str().unwrap().contains("disabled"), "{p}");
    let rotated = app.api_post(&format!("/webhooks/{id}/rotate-secret"), &key, json!({}), 200).await;
    assert_ne!(rotated["secret"], created["secret"]);
    let res = app.api(reqwest::Method::DELETE, &format!("/webhooks/{id}"), &key).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let removed: Value = res.json().await.unwrap();
    assert_eq!(removed["events"], off["events"], "the answer shows what it was subscribed to");
    assert_eq!(removed["disabled_reason"], "Removed.");
    app.api_get(&format!("/webhooks/{id}"), &key, 404).await;
    // Its secrets (the current one and the one before the rotation) are erased at once, and an
    // erased value is nothing for the key commands to re-wrap or count.
    let stored = app
        .text(&format!(
            "SELECT secret_sealed || '|' || COALESCE(previous_secret_sealed, '') FROM {{schema}}.webhook_endpoints \
             WHERE id = '{id}'"
        ))
        .await;
    assert_eq!(stored, "|");
    let report = app.cli_json(&["keys", "rewrap"]);
    assert_eq!(report["remaining"], json!([]), "{report}");
    assert!(report["unreadable"].as_array().is_none_or(|u| u.is_empty()), "{report}");
    let audit = app.api_get("/audit-events?action=webhook.created", &key, 200).await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 1);
    assert!(!app.database_dump().await.contains(secret), "the secret is sealed at rest");
}

async fn private_webhook_targets_are_refused(app: TestApp) {
    // A second server without `allow_private_targets`: loopback, private and link-local
    // literals are refused when the endpoint is saved (the resolver-based refusal of names is
    // unit-tested with a stub resolver in src/net.rs).
    let key_env = app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1.clone();
    let strict = TestApp::spawn_with(
        app.backend.clone(),
        &[("AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "false"), ("AUTHLINK_MASTER_KEY", &key_env)],
    )
    .await;
    let cleanup = strict.cleanup_handle();
    let wid = strict.workspace("Strict");
    let key = strict.workspace_key(&wid);
    for url in [
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://169.254.169.254/latest",
        "https://10.0.0.5/x",
        "https://192.168.1.1/",
        "http://example.com/",
    ] {
        let p = strict.api_post("/webhooks", &key, json!({"url": url}), 422).await;
        assert_eq!(p["errors"][0]["field"], "url", "{url}: {p}");
    }
    cleanup.run().await;

    // Only the receiver's own network allowed (`webhooks.private_networks`): an http receiver
    // in it is saved and delivered to; other private addresses, and plain http over the
    // internet, are refused.
    let narrow = TestApp::spawn_with(
        app.backend.clone(),
        &[
            ("AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "false"),
            ("AUTHLINK_WEBHOOKS__PRIVATE_NETWORKS", "[127.0.0.0/8]"),
            ("AUTHLINK_MASTER_KEY", &key_env),
        ],
    )
    .await;
    let cleanup = narrow.cleanup_handle();
    let wid = narrow.workspace("Narrow");
    let key = narrow.workspace_key(&wid);
    for url in [
        "https://10.0.0.5/x",
        "https://[::1]/hook",
        "https://169.254.169.254/latest",
        "http://93.184.216.34/",
    ] {
        let p = narrow.api_post("/webhooks", &key, json!({"url": url}), 422).await;
        assert_eq!(p["errors"][0]["field"], "url", "{url}: {p}");
    }
    let receiver = Receiver::start().await;
    let endpoint = narrow.api_post("/webhooks", &key, json!({"url": receiver.url}), 201).await;
    let endpoint = endpoint["id"].as_str().unwrap().to_string();
    narrow.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let got = receiver.wait_for(1, 20).await;
    assert!(got[0].body.contains("\"type\":\"webhook.test\""), "{}", got[0].body);
    cleanup.run().await;

    // An http endpoint saved while private targets were allowed is not sent to once they are
    // not, refused for its scheme before its address is looked at (loopback: nothing leaves
    // the machine whatever happens).
    let wid = app.workspace("Was open");
    let key = app.workspace_key(&wid);
    let endpoint = app.api_post("/webhooks", &key, json!({"url": "http://127.0.0.1:9/hook"}), 201).await;
    let endpoint = endpoint["id"].as_str().unwrap().to_string();
    let (app, unused) = app.restart_with(&[("AUTHLINK_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "false")]).await;
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let log = eventually("the attempt to be recorded", 20, || async {
        let log = app.api_get(&format!("/webhooks/{endpoint}/deliveries"), &key, 200).await;
        (log["data"][0]["attempts"] == 1).then_some(log)
    })
    .await;
    let attempt = &log["data"][0]["attempt_log"][0];
    assert!(attempt["error"].as_str().unwrap().contains("not https"), "{attempt}");
    assert!(attempt["status_code"].is_null(), "{attempt}");
    unused.run().await;
}

/// Verifies every received request with the `standardwebhooks` package from PyPI (not our code).
pub fn verify_with_standardwebhooks(secret: &str, received: &[Received]) {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pydeps");
    let have = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .env("PYTHONPATH", &dir)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        let out = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&dir)
            .arg("standardwebhooks==1.1.0")
            .output()
            .expect("python3 with pip is needed for the independent signature check");
        assert!(
            out.status.success(),
            "pip install standardwebhooks failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let messages: Vec<Value> =
        received.iter().map(|r| json!({"headers": r.headers, "body": r.body})).collect();
    let input = json!({"secret": secret, "messages": messages}).to_string();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
data = json.load(sys.stdin)
wh = Webhook(data["secret"])
ok = 0
for m in data["messages"]:
    wh.verify(m["body"], m["headers"])
    ok += 1
    # A tampered body must be refused by the library too.
    try:
        wh.verify(m["body"] + " ", m["headers"])
        print("tampered body accepted"); sys.exit(1)
    except WebhookVerificationError:
        pass
print(ok)
"#;
    let mut python = std::process::Command::new("python3");
    python.args(["-c", script]).env("PYTHONPATH", &dir);
    run_oracle("the PyPI standardwebhooks", python, &input, received.len());
    verify_with_node_standardwebhooks(&input, received.len());
}

/// Runs a signature oracle with the deliveries on its standard input; it must succeed and print
/// how many it verified.
fn run_oracle(name: &str, mut cmd: std::process::Command, input: &str, expected: usize) {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{name} could not be started: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name} refused a signature: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected.to_string());
}

/// The script of [`verify_with_node_standardwebhooks`].
const NODE_VERIFY: &str = r#"
import { readFileSync } from "node:fs";
import { Webhook } from "standardwebhooks";
const data = JSON.parse(readFileSync(0, "utf8"));
const wh = new Webhook(data.secret);
let ok = 0;
for (const m of data.messages) {
  wh.verify(m.body, m.headers);
  ok += 1;
  const sig = m.headers["webhook-signature"];
  const ts = Number(m.headers["webhook-timestamp"]);
  const altered = [
    ["body", m.body + " ", m.headers],
    ["empty signature", m.body, { ...m.headers, "webhook-signature": "v1," }],
    ["truncated signature", m.body, { ...m.headers, "webhook-signature": sig.split(" ").map((s) => s.slice(0, -4)).join(" ") }],
    ["timestamp +301 s", m.body, { ...m.headers, "webhook-timestamp": String(ts + 301) }],
    ["timestamp -301 s", m.body, { ...m.headers, "webhook-timestamp": String(ts - 301) }],
  ];
  for (const [what, body, headers] of altered) {
    let accepted = true;
    try { wh.verify(body, headers); } catch { accepted = false; }
    if (accepted) { console.log(`altered delivery accepted: ${what}`); process.exit(1); }
  }
}
console.log(ok);
"#;

/// The same check with the `standardwebhooks` package from the npm registry (a second
/// implementation, not our code), which must also refuse each delivery altered: the body, an
/// empty or truncated signature, the timestamp moved by 301 seconds.
fn verify_with_node_standardwebhooks(input: &str, expected: usize) {
    static INSTALL: Mutex<()> = Mutex::new(());
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nodedeps");
    let script = dir.join("verify.mjs");
    {
        // Installed and written once, under the lock, so that no test reads a half-written file.
        let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        if !dir.join("node_modules/standardwebhooks/package.json").exists() {
            std::fs::create_dir_all(&dir).unwrap();
            let out = std::process::Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(&dir)
                .arg("standardwebhooks@1.1.1")
                .output()
                .expect("npm is needed for the second independent signature check");
            assert!(
                out.status.success(),
                "npm install standardwebhooks failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if std::fs::read_to_string(&script).ok().as_deref() != Some(NODE_VERIFY) {
            std::fs::write(&script, NODE_VERIFY).unwrap();
        }
    }
    let mut node = std::process::Command::new("node");
    node.arg(&script).current_dir(&dir);
    run_oracle("the npm standardwebhooks", node, input, expected);
}

async fn webhooks_are_signed_retried_and_redelivered(app: TestApp) {
    let wid = app.workspace("Signed");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    let (endpoint, secret) = add_endpoint(&app, &key, &receiver.url, None).await;
    // The receiver fails the first attempt with 500.
    receiver.script.lock().unwrap().push_back(500);
    let (link_id, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id).await;
    let first = receiver.wait_for(1, 20).await;
    // The retry comes after the first step of the schedule (5 s): move the clock instead of waiting.
    app.advance_clock(10).await;
    let both = receiver.wait_for(2, 20).await;
    assert_eq!(first[0].headers["webhook-id"], both[1].headers["webhook-id"], "a retry keeps its webhook-id");
    let body: Value = serde_json::from_str(&both[1].body).unwrap();
    assert_eq!(body["type"], "connection.created");
    assert_eq!(body["data"]["provider"], "tiktok");
    assert!(body["data"]["repair_url"].as_str().unwrap().contains("/l/"));
    assert!(both[1].headers["webhook-signature"].starts_with("v1,"));
    // The delivery log shows both attempts (once the sender has recorded the second one).
    let log = eventually("the delivery to be recorded as succeeded", 20, || async {
        let log = app.api_get(&format!("/webhooks/{endpoint}/deliveries"), &key, 200).await;
        (log["data"][0]["status"] == "succeeded").then_some(log)
    })
    .await;
    let d = &log["data"][0];
    assert_eq!(d["status"], "succeeded");
    assert_eq!(d["attempts"], 2);
    let attempts = d["attempt_log"].as_array().unwrap();
    assert_eq!(attempts[0]["status_code"], 500);
    assert_eq!(attempts[1]["status_code"], 200);
    assert!(attempts[1]["latency_ms"].is_number());
    // Manual redelivery: same webhook-id again.
    let delivery_id = d["id"].as_str().unwrap();
    app.api_post(&format!("/webhook-deliveries/{delivery_id}/redeliver"), &key, json!({}), 200).await;
    let three = receiver.wait_for(3, 20).await;
    assert_eq!(three[2].headers["webhook-id"], first[0].headers["webhook-id"]);
    // Link events.
    app.cli_json(&["link", "rotate", &link_id]);
    app.cli_json(&["link", "revoke", &link_id]);
    let all = receiver.wait_for(5, 20).await;
    let types = receiver.types();
    assert!(
        types.contains(&"link.rotated".to_string()) && types.contains(&"link.revoked".to_string()),
        "{types:?}"
    );
    // During a secret rotation both secrets sign.
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let with_test = receiver.wait_for(6, 20).await;
    verify_with_standardwebhooks(&secret, &all);
    verify_with_standardwebhooks(&secret, &with_test[5..]);
    let rotated = app.api_post(&format!("/webhooks/{endpoint}/rotate-secret"), &key, json!({}), 200).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let after = receiver.wait_for(7, 20).await;
    let last = &after[6..];
    assert_eq!(last[0].headers["webhook-signature"].split(' ').count(), 2, "old and new secret both sign");
    verify_with_standardwebhooks(&new_secret, last);
    verify_with_standardwebhooks(&secret, last);
    // Not again while the old secret still signs: that would drop it at once.
    let p = app.api_post(&format!("/webhooks/{endpoint}/rotate-secret"), &key, json!({}), 409).await;
    assert!(p["detail"].as_str().unwrap().contains("less than a day ago"), "{p}");
    // Unless the secret leaked: then a new one, and neither the leaked one nor the one before
    // it signs any more.
    let path = format!("/webhooks/{endpoint}/rotate-secret?stop_current_now=true");
    let replaced = app.api_post(&path, &key, json!({}), 200).await;
    let third_secret = replaced["secret"].as_str().unwrap().to_string();
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let after = receiver.wait_for(8, 20).await;
    let last = &after[7..];
    assert_eq!(last[0].headers["webhook-signature"].split(' ').count(), 1, "only the new secret signs");
    verify_with_standardwebhooks(&third_secret, last);
    let audit = app.api_get("/audit-events?action=webhook.secret_rotated", &key, 200).await;
    assert_eq!(audit["data"][0]["details"]["current_stops"], "now", "{audit}");
    app.api_post(&format!("/webhooks/{endpoint}/rotate-secret?stop_current_now=maybe"), &key, json!({}), 422)
        .await;
    // A rotation that keeps the current secret is possible at once again: none was kept.
    app.api_post(&format!("/webhooks/{endpoint}/rotate-secret"), &key, json!({}), 200).await;
    app.advance_clock(24 * 3600 + 60).await;
    app.api_post(&format!("/webhooks/{endpoint}/rotate-secret"), &key, json!({}), 200).await;
}

async fn gone_endpoint_is_disabled(app: TestApp) {
    let wid = app.workspace("Gone Hooks");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    let (endpoint, _) = add_endpoint(&app, &key, &receiver.url, None).await;
    let watcher = Receiver::start().await;
    let (_, watcher_secret) =
        add_endpoint(&app, &key, &watcher.url, Some(vec!["webhook.endpoint_disabled"])).await;
    receiver.script.lock().unwrap().push_back(410);
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    receiver.wait_for(1, 20).await;
    let e = eventually("the endpoint to be disabled", 20, || async {
        let e = app.api_get(&format!("/webhooks/{endpoint}"), &key, 200).await;
        (e["enabled"] == false).then_some(e)
    })
    .await;
    assert!(e["disabled_reason"].as_str().unwrap().contains("410"));
    let audit = app.api_get("/audit-events?action=webhook.disabled", &key, 200).await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 1);
    // The workspace's other endpoints are told, signed like any event; the disabled one is not.
    let told = watcher.wait_for(1, 20).await;
    verify_with_standardwebhooks(&watcher_secret, &told);
    let event: serde_json::Value = serde_json::from_str(&told[0].body).unwrap();
    assert_eq!(event["type"], "webhook.endpoint_disabled", "{event}");
    assert_eq!(event["data"]["endpoint_id"], endpoint.as_str());
    // Named by its origin only: the others may be other parties, and a URL may carry a token.
    let origin = url::Url::parse(&receiver.url).unwrap().origin().ascii_serialization();
    assert_eq!(event["data"]["origin"], origin.as_str());
    assert!(event["data"].get("url").is_none(), "{event}");
    assert!(event["data"]["reason"].as_str().unwrap().contains("410"), "{event}");
    assert_eq!(receiver.got.lock().unwrap().len(), 1, "only the test event reached the disabled endpoint");
}

/// The server restarted without background jobs (and with `extra`), with one connection of
/// sandbox TikTok account `account` made through a link of a new workspace `name`: the server,
/// its restart's cleanup, the workspace's key and the connection's id.
async fn one_tiktok_connection(
    app: TestApp,
    name: &str,
    extra: &[(&str, &str)],
    account: usize,
) -> (TestApp, crate::helpers::Cleanup, String, String) {
    let mut settings = vec![("AUTHLINK_JOBS__ENABLED", "false")];
    settings.extend_from_slice(extra);
    let (app, restarted) = app.restart_with(&settings).await;
    let (key, _, id) = tiktok_connection_through_a_link(&app, name, account).await;
    (app, restarted, key, id)
}

/// A workspace named `name` with a link, through which sandbox TikTok account `account` is
/// connected: the workspace's API key, the link's URL and the connection's id.
async fn tiktok_connection_through_a_link(
    app: &TestApp,
    name: &str,
    account: usize,
) -> (String, String, String) {
    let wid = app.workspace(name);
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[account].open_id).await;
    let id = connection_id(app, &key).await;
    (key, url, id)
}

/// Who holds connection `id`'s refresh lease (`none` when nobody does).
async fn lease_of(app: &TestApp, id: String) -> String {
    app.text(&format!(
        "SELECT COALESCE(lease_owner, 'none') FROM {{schema}}.refresh_schedule WHERE connection_id = '{id}'"
    ))
    .await
}

/// Asks for connection `id`'s disconnect over the API, in a task of its own, while TikTok holds
/// its revocation (4.5 s at most); returns once TikTok holds it. [`released_answer`] lets it go.
async fn disconnect_held_at_tiktok(
    app: &TestApp,
    id: &str,
    key: &str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    post_held_at_tiktok(app, key, &format!("/connections/{id}/disconnect"), "revoke", 4_500).await
}

/// Lets TikTok answer the revocation it holds: the held disconnect's status and answer.
async fn released_answer(
    app: &TestApp,
    disconnecting: tokio::task::JoinHandle<reqwest::Response>,
) -> (u16, Value) {
    release(app).await;
    let answer = disconnecting.await.unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

async fn connection_id(app: &TestApp, key: &str) -> String {
    app.api_get("/connections", key, 200).await["data"][0]["id"].as_str().unwrap().to_string()
}

async fn transient_refresh_failures_recover(app: TestApp) {
    let wid = app.workspace("Transient");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    add_endpoint(
        &app,
        &key,
        &receiver.url,
        Some(vec!["connection.refresh_failed", "connection.recovered", "connection.broken"]),
    )
    .await;
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id).await;
    let id = connection_id(&app, &key).await;
    let before = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    // The scheduler refreshes at 75-80 % of the 24 h lifetime: make it due, with four failures
    // scripted (server error, 429 with Retry-After, HTML page, slow answer).
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [
        {"endpoint": "refresh", "kind": "server_error"},
        {"endpoint": "refresh", "kind": "rate_limit"},
        {"endpoint": "refresh", "kind": "html_error"},
        {"endpoint": "refresh", "kind": "server_error"}
    ], "retry_after_secs": 120}),
    )
    .await;
    app.advance_clock(70_000).await;
    for failures in 1..=4 {
        eventually(&format!("{failures} failed refreshes"), 30, || async {
            let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
            (c["refresh_failures"].as_i64() == Some(failures)).then_some(c)
        })
        .await;
        let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
        assert_eq!(c["status"], "active", "transient failures never break a connection");
        app.advance_clock(3700).await;
    }
    let recovered = eventually("the refresh to succeed", 30, || async {
        let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
        (c["refresh_failures"] == 0 && c["last_refreshed_at"] != before["last_refreshed_at"]).then_some(c)
    })
    .await;
    assert_eq!(recovered["status"], "active");
    receiver.wait_for_messages(2, 20).await;
    assert_eq!(receiver.types(), vec!["connection.refresh_failed", "connection.recovered"]);
    let kinds: Vec<String> = recovered["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(
        kinds.contains(&"refresh_failed".into())
            && kinds.contains(&"recovered".into())
            && kinds.contains(&"refreshed".into())
    );
    let stats = app.sandbox_stats("tiktok").await;
    assert_eq!(stats["refresh_token_reuse"], 0);
}

/// A scheduled refresh whose provider answer arrives after the client reconnected: the answer is
/// older than the stored grant, so it is dropped (compare-and-set on the token generation), the
/// attempt is recorded as superseded, and the reconnect's tokens stay and keep working.
async fn refresh_overtaken_by_a_reconnect_keeps_the_new_grant(app: TestApp) {
    // The provider's time limit outlasts the reconnect, run while TikTok holds the refresh.
    let (app, restarted) = app.restart_with(&[("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "20")]).await;
    let (key, url, id) = tiktok_connection_through_a_link(&app, "Overtaken", 0).await;
    let account = authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id;
    // The next refresh is held at TikTok until the client has reconnected.
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "hold"}], "slow_ms": 60_000}),
    )
    .await;
    app.advance_clock(70_000).await;
    held_at_tiktok(&app, "the scheduled refresh to be held at TikTok").await;
    connect(&app.client, &app, &url, "tiktok", account).await;
    release(&app).await;
    let db = authlink::db::Db::connect(
        &app.db_url.clone().into(),
        &authlink::config::DatabaseConfig {
            max_connections: 1,
            acquire_timeout_secs: 5,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outcomes = eventually("the refresh attempt to finish", 30, || async {
        let mut conn = db.read().await.unwrap();
        let attempts = authlink::db::connections::attempts(&mut conn, &id).await.unwrap();
        let outcomes: Vec<String> = attempts.into_iter().map(|a| a.outcome).collect();
        (!outcomes.is_empty() && !outcomes.contains(&"started".to_string())).then(|| json!(outcomes))
    })
    .await;
    db.close().await;
    assert_eq!(outcomes, json!(["superseded"]));
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active");
    assert_eq!(c["reconnect_count"], 1);
    assert_eq!(c["last_refreshed_at"], c["events"].as_array().unwrap().last().unwrap()["at"]);
    let kinds: Vec<&str> =
        c["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "reconnected"], "the dropped answer left no refresh in the history");
    // The stored grant is the reconnect's: refreshing it now works and reuses no refresh token.
    app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    let stats = app.sandbox_stats("tiktok").await;
    assert_eq!(stats["refresh_token_reuse"], 0);
    assert_eq!(stats["invalid_grant"], 0);
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active");
    restarted.run().await;
}

/// An on-demand token read whose refresh the provider refuses after the client reconnected
/// (the app was revoked, then connected again): the refusal was of the old grant, so the
/// connection is not broken and the caller gets the reconnect's token, not a conflict.
async fn refusal_overtaken_by_a_reconnect_gives_the_new_token(app: TestApp) {
    // No scheduler, so that the token read is the one that refreshes; provider calls may take
    // longer than the scripted delay.
    let (app, restarted) = app
        .restart_with(&[("AUTHLINK_JOBS__ENABLED", "false"), ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "20")])
        .await;
    let wid = app.workspace("Overtaken refusal");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let account = authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id;
    connect(&app.client, &app, &url, "tiktok", account).await;
    let id = connection_id(&app, &key).await;
    // The token is about to expire, so reading it refreshes it; TikTok holds that refresh.
    app.advance_clock(86_400).await;
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "hold"}], "slow_ms": 60_000}),
    )
    .await;
    let read = {
        let request = app.api(reqwest::Method::GET, &format!("/connections/{id}/access-token"), &key);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    held_at_tiktok(&app, "the token read's refresh to be held at TikTok").await;
    // Meanwhile the account revokes the app (the refresh will be refused) and connects again.
    app.sandbox(&format!("/tiktok/accounts/{account}/revoke"), json!({})).await;
    connect(&app.client, &app, &url, "tiktok", account).await;
    release(&app).await;
    let res = read.await.unwrap();
    let token = crate::helpers::expect_json(res, 200).await;
    assert_eq!(app.sandbox_stats("tiktok").await["invalid_grant"], 1, "the old grant's refresh was refused");
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!((c["status"].as_str(), c["reconnect_count"].as_i64()), (Some("active"), Some(1)), "{c}");
    // The token given is the reconnect's: reading again (nothing to refresh) gives the same.
    let again = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    assert_eq!(token["access_token"], again["access_token"]);
    restarted.run().await;
}

/// A forced refresh whose caller stops waiting once the provider has rotated the refresh token
/// (the provider answers 3 s late, the caller gives up after half a second): the refresh runs on
/// to its end, the rotated token is stored, and the next refresh sends it, reusing none.
async fn refresh_outlives_the_request_that_asked_for_it(app: TestApp) {
    let (app, restarted, key, id) =
        one_tiktok_connection(app, "Gone caller", &[("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "10")], 0).await;
    let before = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "slow_answer"}], "slow_ms": 3000}),
    )
    .await;
    let calls = app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap();
    let gone = app
        .api(reqwest::Method::POST, &format!("/connections/{id}/refresh"), &key)
        .json(&json!({}))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gone.as_ref().is_err_and(reqwest::Error::is_timeout), "{gone:?}");
    refresh_reached_provider(&app, "the refresh to reach the provider", calls).await;
    // The next read waits for the refresh still running (one refresh of a connection at a time)
    // and gets the token it stored.
    let after = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    assert_ne!(after["access_token"], before["access_token"], "the late answer's token was stored");
    // The stored refresh token is the rotated one: refreshing again works and reuses none.
    let again = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(again["outcome"], "refreshed", "{again}");
    let stats = app.sandbox_stats("tiktok").await;
    assert_eq!((stats["refresh_token_reuse"].as_i64(), stats["invalid_grant"].as_i64()), (Some(0), Some(0)));
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active");
    // A forced refresh asked for while another runs is answered by that one's result: the
    // provider is asked once, and the tokens rotate once.
    let calls = app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap();
    let first = forced_refresh_in_flight(&app, &key, &id, 1000).await;
    let second = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(second["outcome"], "current", "{second}");
    let first = crate::helpers::expect_json(first.await.unwrap(), 200).await;
    assert_eq!(first["outcome"], "refreshed", "{first}");
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap(), calls + 1);
    restarted.run().await;
}

/// A connection broken while its refresh waited for the provider (as a health check in another
/// process does when it finds the token refused; written directly here): the refresh's answer is
/// not stored into it, and it is not put back on the refresh schedule, whose claims it would
/// fill at every round, given back each time.
async fn a_refresh_does_not_revive_a_connection_broken_meanwhile(app: TestApp) {
    let (app, restarted, key, id) =
        one_tiktok_connection(app, "Broken meanwhile", &[("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "10")], 0)
            .await;
    let before = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    let refresh = forced_refresh_held(&app, &key, &id).await;
    app.execute(&format!(
        "UPDATE {{schema}}.connections SET status = 'broken', status_reason = 'Refused by the provider.' \
         WHERE id = '{id}'"
    ))
    .await;
    app.execute(&format!(
        "UPDATE {{schema}}.refresh_schedule SET next_refresh_at = NULL WHERE connection_id = '{id}'"
    ))
    .await;
    release(&app).await;
    refresh.await.unwrap();
    let after = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(after["status"], "broken", "{after}");
    assert_eq!(after["last_refreshed_at"], before["last_refreshed_at"], "the answer was not stored");
    let scheduled = app
        .text(&format!(
            "SELECT COALESCE(CAST(next_refresh_at AS TEXT), 'none') FROM {{schema}}.refresh_schedule \
             WHERE connection_id = '{id}'"
        ))
        .await;
    assert_eq!(scheduled, "none");
    app.api_get(&format!("/connections/{id}/access-token"), &key, 409).await;
    let detail = app
        .text(&format!(
            "SELECT detail FROM {{schema}}.refresh_attempts WHERE connection_id = '{id}' AND outcome = 'superseded'"
        ))
        .await;
    assert!(detail.contains("broken or disconnected meanwhile"), "{detail}");
    restarted.run().await;
}

/// A connection that is not active but still on the refresh schedule (as an older version, or
/// a race, could leave it) is taken off it when the scheduler claims it, instead of being claimed
/// and given back at every round.
async fn an_inactive_connection_leaves_the_refresh_schedule(app: TestApp) {
    let wid = app.workspace("Off schedule");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[2].open_id).await;
    let id = connection_id(&app, &key).await;
    app.execute(&format!("UPDATE {{schema}}.connections SET status = 'broken' WHERE id = '{id}'")).await;
    app.execute(&format!(
        "UPDATE {{schema}}.refresh_schedule SET next_refresh_at = 1 WHERE connection_id = '{id}'"
    ))
    .await;
    eventually("the scheduler to take it off", 20, || async {
        let next = app
            .text(&format!(
                "SELECT COALESCE(CAST(next_refresh_at AS TEXT), 'none') FROM {{schema}}.refresh_schedule \
                 WHERE connection_id = '{id}'"
            ))
            .await;
        (next == "none").then_some(Value::Null)
    })
    .await;
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"], 0, "nothing was refreshed");
}

/// A connection's tokens go only to the kind of provider that issued them: a real connection's
/// never to the sandbox (an instance whose credentials went missing at a restart would find
/// every connection refused, and break them all), a sandbox connection's never to the real
/// provider with the real client secret. Refresh, check and due token reads are refused (409),
/// nothing is sent, and the connection stays as it was; a disconnect leaves a real grant
/// connected (503), and drops a sandbox connection without revoking anything.
async fn tokens_go_only_to_the_provider_they_came_from(app: TestApp) {
    let (app, restarted, key, id) = one_tiktok_connection(app, "Modes", &[], 0).await;
    let stats = || async {
        let s = app.sandbox_stats("tiktok").await;
        (s["refresh_calls"].clone(), s["profile_calls"].clone(), s["revoke_calls"].clone())
    };
    let before = stats().await;
    // As if made with the real TikTok, on an instance that simulates TikTok.
    app.execute(&format!("UPDATE {{schema}}.connections SET sandbox = 0 WHERE id = '{id}'")).await;
    let real = "made with the real TikTok";
    let refused = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 409).await;
    assert!(refused["detail"].as_str().unwrap().contains(real), "{refused}");
    let refused = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 409).await;
    assert!(refused["detail"].as_str().unwrap().contains(real), "{refused}");
    // A token not due is read as it is stored; one due is not refreshed here.
    app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    let due = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 + 120_000;
    app.execute(&format!("UPDATE {{schema}}.connections SET access_expires_at = {due} WHERE id = '{id}'"))
        .await;
    let refused = app.api_get(&format!("/connections/{id}/access-token"), &key, 409).await;
    assert!(refused["detail"].as_str().unwrap().contains(real), "{refused}");
    let kept = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 503).await;
    assert!(kept["detail"].as_str().unwrap().contains("not disconnected"), "{kept}");
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active", "{c}");
    assert_eq!(stats().await, before, "nothing sent to the sandbox");
    // Made with the sandbox, as it was: served again.
    app.execute(&format!("UPDATE {{schema}}.connections SET sandbox = 1 WHERE id = '{id}'")).await;
    app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"], before.0.as_i64().unwrap() + 1);
    // The same instance with TikTok's credentials (its endpoints on a closed port): the sandbox
    // connection is neither refreshed nor revoked there, and its jobs say so at start.
    let closed = "http://127.0.0.1:9";
    let (app, unused) = app
        .restart_with(&[
            ("AUTHLINK_JOBS__ENABLED", "true"),
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_KEY", "live-key"),
            ("AUTHLINK_PROVIDERS__TIKTOK__CLIENT_SECRET", "live-secret"),
            ("AUTHLINK_PROVIDERS__TIKTOK__AUTHORIZE_URL", &format!("{closed}/authorize")),
            ("AUTHLINK_PROVIDERS__TIKTOK__TOKEN_URL", &format!("{closed}/token")),
            ("AUTHLINK_PROVIDERS__TIKTOK__API_BASE_URL", closed),
        ])
        .await;
    app.wait_for_log(
        "1 active connection(s) left alone: the connection was made with the TikTok sandbox",
        30,
    )
    .await;
    let refused = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 409).await;
    assert!(refused["detail"].as_str().unwrap().contains("made with the TikTok sandbox"), "{refused}");
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    assert_eq!(done["status"], "disconnected", "{done}");
    assert!(done["status_reason"].as_str().unwrap().contains("made with the TikTok sandbox"), "{done}");
    unused.run().await;
    restarted.run().await;
}

/// A health check does not ask the provider while another process holds the connection's
/// lease for a refresh (its finding would be about a token being replaced); it is told, and runs
/// once the lease is free.
async fn a_check_does_not_run_during_another_process_refresh(app: TestApp) {
    let (app, restarted, key, id) = one_tiktok_connection(app, "Leased", &[], 1).await;
    let far = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 + 3_600_000;
    app.execute(&format!(
        "UPDATE {{schema}}.refresh_schedule SET lease_owner = 'another-process', lease_until = {far} \
         WHERE connection_id = '{id}'"
    ))
    .await;
    let profiles = app.sandbox_stats("tiktok").await["profile_calls"].as_i64().unwrap();
    let asked = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let held = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(held["outcome"], "transient", "{held}");
    assert!(held["detail"].as_str().unwrap().contains("another process"), "{held}");
    // Checked again in a few minutes, not a whole interval later.
    let next: i64 = app
        .text(&format!("SELECT CAST(next_check_at AS TEXT) FROM {{schema}}.connections WHERE id = '{id}'"))
        .await
        .parse()
        .unwrap();
    assert!((asked + 240_000..asked + 360_000).contains(&next), "{next} against {asked}");
    assert_eq!(app.sandbox_stats("tiktok").await["profile_calls"].as_i64().unwrap(), profiles);
    app.execute(&format!(
        "UPDATE {{schema}}.refresh_schedule SET lease_owner = NULL, lease_until = NULL WHERE connection_id = '{id}'"
    ))
    .await;
    let checked = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(checked["outcome"], "current", "{checked}");
    assert_eq!(app.sandbox_stats("tiktok").await["profile_calls"].as_i64().unwrap(), profiles + 1);
    // The check gave its lease back.
    let lease = app
        .text(&format!(
            "SELECT COALESCE(lease_owner, 'none') FROM {{schema}}.refresh_schedule WHERE connection_id = '{id}'"
        ))
        .await;
    assert_eq!(lease, "none");
    restarted.run().await;
}

/// A token read that finds the token due and another process's refresh in flight waits for it
/// only as long as the request's time allows (request timeout − provider timeout − 5 s, here
/// 2 s), then answers with the current token while it is valid for a minute more, or 503: not
/// the request timeout's 503 after waiting for the whole lease (it waited up to 65 s).
async fn a_token_read_waits_for_another_process_refresh_within_the_request(app: TestApp) {
    let settings = [("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "9"), ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "2")];
    let (app, restarted, key, id) = one_tiktok_connection(app, "Read Leased", &settings, 0).await;
    let token =
        app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await["access_token"].clone();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let far = now + 3_600_000;
    app.execute(&format!(
        "UPDATE {{schema}}.refresh_schedule SET lease_owner = 'another-process', lease_until = {far} \
         WHERE connection_id = '{id}'"
    ))
    .await;
    let refreshes = app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap();
    // Due (four minutes left), still valid for more than a minute: the current token.
    let expires = now + 240_000;
    app.execute(&format!(
        "UPDATE {{schema}}.connections SET access_expires_at = {expires} WHERE id = '{id}'"
    ))
    .await;
    let read = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    assert_eq!(read["access_token"], token, "{read}");
    // Thirty seconds left: not worth handing out, and not refreshed here either: 503.
    let expires = now + 30_000;
    app.execute(&format!(
        "UPDATE {{schema}}.connections SET access_expires_at = {expires} WHERE id = '{id}'"
    ))
    .await;
    let refused = app.api_get(&format!("/connections/{id}/access-token"), &key, 503).await;
    assert_eq!(refused["code"], "provider_unavailable", "{refused}");
    assert!(refused["detail"].as_str().unwrap().contains("another refresh"), "{refused}");
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap(), refreshes);
    // The lease given back: the read refreshes.
    app.execute(&format!(
        "UPDATE {{schema}}.refresh_schedule SET lease_owner = NULL, lease_until = NULL WHERE connection_id = '{id}'"
    ))
    .await;
    let fresh = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    assert_ne!(fresh["access_token"], token, "{fresh}");
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap(), refreshes + 1);
    restarted.run().await;
}

/// A token read whose refresh fails for now answers 503 (try again) when the current token has
/// less than a minute left, but not once the connection was broken meanwhile (by another
/// process, while TikTok was asked): then 409 with the connection's status and reason, as when
/// found broken at once, for trying again would not help.
async fn a_token_read_refuses_a_connection_broken_during_its_failed_refresh(app: TestApp) {
    let settings = [("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "12"), ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "3")];
    let (app, restarted, key, id) = one_tiktok_connection(app, "Read Broken", &settings, 0).await;
    // Forty seconds left: refreshed before it is handed out, and not handed out without.
    let expires = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 + 40_000;
    app.execute(&format!(
        "UPDATE {{schema}}.connections SET access_expires_at = {expires} WHERE id = '{id}'"
    ))
    .await;
    // TikTok holds the read's refresh past the provider's 3 s: it fails for now.
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "hold"}], "slow_ms": 30_000}),
    )
    .await;
    let read = {
        let request = app.api(reqwest::Method::GET, &format!("/connections/{id}/access-token"), &key);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    held_at_tiktok(&app, "the token read's refresh to be held at TikTok").await;
    app.execute(&format!(
        "UPDATE {{schema}}.connections SET status = 'broken', status_reason = 'Broken elsewhere.' WHERE id = '{id}'"
    ))
    .await;
    let refused = crate::helpers::expect_json(read.await.unwrap(), 409).await;
    let detail = refused["detail"].as_str().unwrap();
    assert!(detail.contains("broken") && detail.contains("Broken elsewhere."), "{refused}");
    assert!(refused.get("access_token").is_none(), "{refused}");
    let reads = app
        .text("SELECT CAST(COUNT(*) AS TEXT) FROM {schema}.audit_log WHERE action = 'connection.token_read'")
        .await;
    assert_eq!(reads, "0", "no token was handed out");
    restarted.run().await;
}

/// A disconnect holds the connection's refresh lease while it revokes the grant, so that no
/// process refreshes the tokens being revoked (or meets the revoked grant and reports the
/// connection broken); a lease another process keeps past the request's time does not stop it.
async fn a_disconnect_holds_the_refresh_lease_while_it_revokes(app: TestApp) {
    let settings = [("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "12"), ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "5")];
    let (app, restarted, key, id) = one_tiktok_connection(app, "Disconnect Leased", &settings, 0).await;
    let lease_of = |id: String| lease_of(&app, id);
    assert_eq!(lease_of(id.clone()).await, "none");
    // TikTok holds the revocation: the lease is held while it runs, and the connection is still
    // active then (within the provider's 5 s).
    let disconnecting = disconnect_held_at_tiktok(&app, &id, &key).await;
    assert_ne!(lease_of(id.clone()).await, "none", "held while TikTok is asked");
    let during = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(during["status"], "active", "taken before the revocation ends: {during}");
    let (status, done) = released_answer(&app, disconnecting).await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "disconnected", "{done}");
    assert!(done["status_reason"].as_str().unwrap().contains("revoked at the provider"), "{done}");
    assert_eq!(lease_of(id.clone()).await, "none", "given back");
    // Disconnected meanwhile by someone else (as by another process that went ahead without the
    // lease): the answer is the connection as it stands, and the lease is given back all the
    // same, for a reconnect may make the connection active again before it would run out.
    let (key, _, id) = tiktok_connection_through_a_link(&app, "Disconnect Raced Elsewhere", 2).await;
    let disconnecting = disconnect_held_at_tiktok(&app, &id, &key).await;
    app.execute(&format!(
        "UPDATE {{schema}}.connections SET status = 'disconnected', status_reason = 'elsewhere' WHERE id = '{id}'"
    ))
    .await;
    let (status, done) = released_answer(&app, disconnecting).await;
    assert_eq!(status, 200);
    assert_eq!(done["status_reason"], "elsewhere", "{done}");
    assert_eq!(lease_of(id.clone()).await, "none", "given back");
    // Another account, whose lease another process holds (and keeps): the disconnect waits for it
    // within the request's time (12 − 5 − 5 = 2 s), then goes ahead.
    let wid = app.workspace("Disconnect Held");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[1].open_id).await;
    let other = connection_id(&app, &key).await;
    let far = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 + 3_600_000;
    app.execute(&format!(
        "UPDATE {{schema}}.refresh_schedule SET lease_owner = 'another-process', lease_until = {far} \
         WHERE connection_id = '{other}'"
    ))
    .await;
    let done = app.api_post(&format!("/connections/{other}/disconnect"), &key, json!({}), 200).await;
    assert_eq!(done["status"], "disconnected", "{done}");
    assert_eq!(
        lease_of(other.clone()).await,
        "another-process",
        "another process's lease is not ours to free"
    );
    restarted.run().await;
}

/// A disconnect erases the only tokens that could revoke the grant later: while TikTok cannot
/// revoke it for now (5xx, 429, unreachable) or refuses authlink's credentials, the disconnect
/// answers 503 and the connection stays connected; a dead grant does not stop it, and the
/// reason says the grant may still be listed in the account's settings. An access token TikTok
/// refuses otherwise is refreshed once and offered again, and one about to run out is refreshed
/// first.
async fn a_disconnect_changes_nothing_while_the_grant_cannot_be_revoked(app: TestApp) {
    let (app, restarted, key, id) = one_tiktok_connection(app, "Disconnect Refused", &[], 0).await;
    let token =
        app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await["access_token"].clone();
    let events_sql = format!(
        "SELECT CAST(COUNT(*) AS TEXT) FROM {{schema}}.connection_events WHERE connection_id = '{id}'"
    );
    let events_before = app.text(&events_sql).await;
    let calls =
        |stats: &Value| (stats["refresh_calls"].as_i64().unwrap(), stats["revoke_calls"].as_i64().unwrap());
    for (kind, says) in [
        ("server_error", "could not revoke the grant right now"),
        ("rate_limit", "could not revoke the grant right now"),
        ("temporarily_unavailable", "could not revoke the grant right now"),
        ("slow", "could not revoke the grant right now"),
        ("invalid_client", "refused authlink's own settings"),
    ] {
        app.sandbox(
            "/tiktok/scenario",
            json!({"fail_next": [{"endpoint": "revoke", "kind": kind}], "slow_ms": 3_000}),
        )
        .await;
        let refused = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 503).await;
        let detail = refused["detail"].as_str().unwrap();
        assert!(detail.contains(says) && detail.contains("was not disconnected"), "{kind}: {refused}");
        // Still connected, with the same token, nothing recorded, and the lease given back.
        assert_eq!(app.api_get(&format!("/connections/{id}"), &key, 200).await["status"], "active", "{kind}");
        let read = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
        assert_eq!(read["access_token"], token, "{kind}");
        assert_eq!(app.text(&events_sql).await, events_before, "{kind}");
        assert_eq!(lease_of(&app, id.clone()).await, "none", "{kind}");
    }
    // The CLI says the same, and fails.
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "revoke", "kind": "server_error"}]}))
        .await;
    let out = app.cli(&["connection", "disconnect", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not revoke the grant right now"), "{out:?}");
    let audit = app.cli_json(&["audit", "list", "--action", "connection.disconnected"]);
    assert_eq!(audit.as_array().unwrap().len(), 0, "{audit}");
    // A grant dead at TikTok does not keep the connection, nor is it refreshed first.
    let before = calls(&app.sandbox_stats("tiktok").await);
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "revoke", "kind": "invalid_grant"}]}))
        .await;
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    assert_eq!(done["status"], "disconnected", "{done}");
    let reason = done["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("the grant is no longer valid at TikTok") && reason.contains("may still be listed"),
        "{done}"
    );
    assert_eq!(calls(&app.sandbox_stats("tiktok").await), (before.0, before.1 + 1));

    // A refusal that does not say the grant is dead (here a 400 whose answer cannot be read): the
    // access token is refreshed, and the new one revokes the grant.
    let refusal = |count: u32| json!({"fail_next": [{"endpoint": "revoke", "kind": "html_error", "status": 400, "count": count}]});
    let (key, _, id) = tiktok_connection_through_a_link(&app, "Disconnect Token Refused", 1).await;
    let before = calls(&app.sandbox_stats("tiktok").await);
    app.sandbox("/tiktok/scenario", refusal(1)).await;
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    assert_eq!(done["status_reason"], "Disconnected by the agency (revoked at the provider).", "{done}");
    assert_eq!(calls(&app.sandbox_stats("tiktok").await), (before.0 + 1, before.1 + 2));
    // Refused again after the refresh: it goes, saying so.
    let (key, _, id) = tiktok_connection_through_a_link(&app, "Disconnect Token Refused Twice", 2).await;
    let before = calls(&app.sandbox_stats("tiktok").await);
    app.sandbox("/tiktok/scenario", refusal(2)).await;
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    let reason = done["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("revocation refused by TikTok") && reason.contains("may still be listed"),
        "{done}"
    );
    assert_eq!(calls(&app.sandbox_stats("tiktok").await), (before.0 + 1, before.1 + 2));

    // An access token about to run out (no jobs refresh it here) is refreshed first; while that
    // fails for now, the connection stays connected and nothing is sent to be revoked.
    let (key, _, id) = tiktok_connection_through_a_link(&app, "Disconnect Expiring", 0).await;
    app.advance_clock(86_400).await;
    let before = calls(&app.sandbox_stats("tiktok").await);
    app.sandbox("/tiktok/scenario", json!({"fail_next": [{"endpoint": "refresh", "kind": "server_error"}]}))
        .await;
    let refused = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 503).await;
    assert!(
        refused["detail"].as_str().unwrap().contains("could not be refreshed before the grant is revoked"),
        "{refused}"
    );
    assert_eq!(app.api_get(&format!("/connections/{id}"), &key, 200).await["status"], "active");
    assert_eq!(calls(&app.sandbox_stats("tiktok").await), (before.0 + 1, before.1));
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    assert_eq!(done["status_reason"], "Disconnected by the agency (revoked at the provider).", "{done}");
    assert_eq!(calls(&app.sandbox_stats("tiktok").await), (before.0 + 2, before.1 + 1));
    restarted.run().await;
}

/// A connection broken for a withdrawn scope keeps a live grant, whose access token runs out
/// within a day: refused, that token is refreshed by the disconnect (the refresh service leaves
/// broken connections alone), the new tokens stored on the still-broken connection first, so that
/// a revocation that then fails for now leaves the grant revocable; a refresh that fails for now
/// leaves it connected, and one that finds the grant dead lets the disconnect go on.
async fn a_broken_connections_grant_is_revoked_with_a_refreshed_token(app: TestApp) {
    let (app, restarted) = app
        .restart_with(&[
            ("AUTHLINK_JOBS__ENABLED", "false"),
            ("AUTHLINK_PROVIDERS__TIKTOK__REQUIRED_SCOPES", "[user.info.basic,user.info.profile]"),
        ])
        .await;
    let broken = |name: &'static str, account: usize| {
        let app = &app;
        async move {
            let (key, _, id) = tiktok_connection_through_a_link(app, name, account).await;
            let open_id = authlink::sandbox::TIKTOK_ACCOUNTS[account].open_id;
            app.sandbox(
                &format!("/tiktok/accounts/{open_id}/withdraw-scopes"),
                json!({"scopes": ["user.info.profile"]}),
            )
            .await;
            let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
            assert_eq!(out["outcome"], "broken", "{out}");
            (key, id)
        }
    };
    let calls = |s: &Value| (s["refresh_calls"].as_i64().unwrap(), s["revoke_calls"].as_i64().unwrap());
    let refused_once = json!({"endpoint": "revoke", "kind": "html_error", "status": 400});
    let (key, id) = broken("Broken Disconnect", 0).await;
    let status_of = |key: String, id: String| {
        let app = &app;
        async move { app.api_get(&format!("/connections/{id}"), &key, 200).await["status"].clone() }
    };
    // Refused, and the refresh fails for now: still connected (broken), nothing erased.
    let before = calls(&app.sandbox_stats("tiktok").await);
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [refused_once, {"endpoint": "refresh", "kind": "server_error"}]}),
    )
    .await;
    let kept = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 503).await;
    assert!(kept["detail"].as_str().unwrap().contains("not disconnected"), "{kept}");
    assert_eq!(status_of(key.clone(), id.clone()).await, "broken");
    assert_eq!(calls(&app.sandbox_stats("tiktok").await), (before.0 + 1, before.1 + 1));
    // Refreshed, and the new token's revocation fails for now: the new tokens are kept.
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [refused_once, {"endpoint": "revoke", "kind": "server_error"}]}),
    )
    .await;
    app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 503).await;
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "broken", "{c}");
    let last = c["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["kind"].as_str(), last["detail"].as_str()),
        (Some("refreshed"), Some("to revoke the grant before a disconnect")),
        "{c}"
    );
    assert_eq!(calls(&app.sandbox_stats("tiktok").await), (before.0 + 2, before.1 + 3));
    // Refused once more: refreshed with the rotated refresh token stored then, and revoked.
    app.sandbox("/tiktok/scenario", json!({"fail_next": [refused_once]})).await;
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    assert_eq!(done["status_reason"], "Disconnected by the agency (revoked at the provider).", "{done}");
    let stats = app.sandbox_stats("tiktok").await;
    assert_eq!(calls(&stats), (before.0 + 3, before.1 + 5));
    assert_eq!(
        (stats["refresh_token_reuse"].as_i64(), stats["invalid_grant"].as_i64()),
        (Some(0), Some(0)),
        "{stats}"
    );
    // A refresh that finds the grant dead: nothing left to revoke, the disconnect goes on.
    let (key, id) = broken("Broken Disconnect Dead", 1).await;
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [refused_once, {"endpoint": "refresh", "kind": "invalid_grant"}]}),
    )
    .await;
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    let reason = done["status_reason"].as_str().unwrap();
    assert!(reason.contains("no longer valid") && reason.contains("may still be listed"), "{done}");
    restarted.run().await;
}

/// A client who reconnects while the agency's disconnect waits for TikTok keeps the connection
/// they were just told is made: the disconnect answers 409, records it, and makes the
/// connection's health check due at once.
async fn a_reconnect_during_a_disconnect_is_kept(app: TestApp) {
    let settings = [
        ("AUTHLINK_JOBS__ENABLED", "false"),
        ("AUTHLINK_HTTP__REQUEST_TIMEOUT_SECS", "12"),
        ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "5"),
    ];
    let (app, restarted) = app.restart_with(&settings).await;
    let (key, url, id) = tiktok_connection_through_a_link(&app, "Disconnect Raced", 0).await;
    let account = authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id;
    let disconnecting = disconnect_held_at_tiktok(&app, &id, &key).await;
    // The client reconnects meanwhile, in a browser of their own.
    let browser = crate::connect::new_browser();
    connect(&browser, &app, &url, "tiktok", account).await;
    let (status, refused) = released_answer(&app, disconnecting).await;
    assert_eq!(status, 409);
    let detail = refused["detail"].as_str().unwrap();
    assert!(detail.contains("reconnected this account after the disconnect was asked for"), "{refused}");
    assert!(detail.contains("earlier grant was revoked"), "{refused}");
    let kept = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(
        (kept["status"].as_str(), kept["reconnect_count"].as_i64()),
        (Some("active"), Some(1)),
        "{kept}"
    );
    assert_eq!(lease_of(&app, id.clone()).await, "none");
    // What happened is recorded, and the new grant is checked at once (TikTok may have ended it
    // with the old one; the sandbox ends only the grant revoked, so it still works here).
    let audit = app.cli_json(&["audit", "list", "--action", "connection.disconnect_overtaken"]);
    assert_eq!(audit[0]["target_id"], id.as_str(), "{audit}");
    let now = i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap();
    let due = app
        .text(&format!("SELECT CAST(next_check_at AS TEXT) FROM {{schema}}.connections WHERE id = '{id}'"))
        .await;
    assert!(due.parse::<i64>().unwrap() <= now, "check due at {due}, now {now}");
    let checked = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(checked["outcome"], "current", "{checked}");
    // Tokens stored meanwhile, as by a process that kept the lease past the disconnect's wait (a
    // refresh of the grant being revoked, which goes with it), do not stop a disconnect.
    let disconnecting = disconnect_held_at_tiktok(&app, &id, &key).await;
    app.execute(&format!(
        "UPDATE {{schema}}.connections SET token_generation = token_generation + 1 WHERE id = '{id}'"
    ))
    .await;
    let (status, done) = released_answer(&app, disconnecting).await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "disconnected", "{done}");
    restarted.run().await;
}

/// Tokens that no configured key opens (here the access token's place holds the refresh token,
/// sealed for another purpose): a refresh sends nothing to the provider, finishes its attempt
/// and breaks the connection with a reason, instead of failing with a 500 and leaving the
/// attempt open for the lease to run out and the next claim to fail again.
async fn unreadable_tokens_break_the_connection(app: TestApp) {
    let (app, restarted, key, id) = one_tiktok_connection(app, "Unreadable", &[], 0).await;
    let db = authlink::db::Db::connect(
        &app.db_url.clone().into(),
        &authlink::config::DatabaseConfig {
            max_connections: 1,
            acquire_timeout_secs: 5,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // First sealed with a key this process does not hold (as when another process, started
    // with a newer master key, sealed them): not the connection's fault; retried later.
    let (sealed,): (String,) = sqlx::query_as("SELECT access_token_sealed FROM connections WHERE id = $1")
        .bind(&id)
        .fetch_one(&mut *db.read().await.unwrap())
        .await
        .unwrap();
    let (version, rest) = sealed.split_once(':').unwrap();
    let (_kid, rest) = rest.split_once(':').unwrap();
    sqlx::query("UPDATE connections SET access_token_sealed = $2 WHERE id = $1")
        .bind(&id)
        .bind(format!("{version}:someotherkey:{rest}"))
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
    let calls = app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap();
    let run = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(run["outcome"], "transient", "{run}");
    assert!(run["detail"].as_str().unwrap().contains("someotherkey"), "{run}");
    assert_eq!(run["connection"]["status"], "active");
    // Nor is it disconnected here: only a process holding that key can revoke the grant.
    let refused = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 503).await;
    let detail = refused["detail"].as_str().unwrap();
    assert!(detail.contains("someotherkey") && detail.contains("was not disconnected"), "{refused}");
    assert_eq!(app.api_get(&format!("/connections/{id}"), &key, 200).await["status"], "active");
    // Then failing to open with the key it names (here the access token's place holds the
    // refresh token, sealed for another place): broken.
    sqlx::query("UPDATE connections SET access_token_sealed = refresh_token_sealed WHERE id = $1")
        .bind(&id)
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
    let run = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(run["outcome"], "broken", "{run}");
    assert!(run["detail"].as_str().unwrap().contains("cannot be opened"), "{run}");
    assert_eq!(run["connection"]["status"], "broken");
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_calls"].as_i64().unwrap(), calls, "nothing sent");
    let mut conn = db.read().await.unwrap();
    let attempts = authlink::db::connections::attempts(&mut conn, &id).await.unwrap();
    drop(conn);
    db.close().await;
    let mut outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome.as_str()).collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["permanent", "transient"]);
    // Broken, it is not refreshed again: the client's link repairs it.
    app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 409).await;
    // Nor can its grant be revoked, but the agency can still remove it.
    let revokes = app.sandbox_stats("tiktok").await["revoke_calls"].as_i64().unwrap();
    let done = app.api_post(&format!("/connections/{id}/disconnect"), &key, json!({}), 200).await;
    assert_eq!(done["status"], "disconnected", "{done}");
    assert!(done["status_reason"].as_str().unwrap().contains("cannot be opened"), "{done}");
    assert_eq!(app.sandbox_stats("tiktok").await["revoke_calls"].as_i64().unwrap(), revokes, "nothing sent");
    restarted.run().await;
}

/// Migration 0008 on a database holding connections made before it: every connection gets its
/// schedule and lease, the schedule only while active, and the old columns are gone.
async fn upgrade_to_the_refresh_schedule_keeps_schedules_and_leases(app: TestApp) {
    use sqlx::{Connection, Executor, Row};
    sqlx::any::install_default_drivers();
    let backend = match &app.backend {
        crate::helpers::Backend::Sqlite => "sqlite",
        crate::helpers::Backend::Postgres(_) => "postgres",
    };
    // A database of its own, next to the app's.
    let (url, schema) = match &app.backend {
        crate::helpers::Backend::Sqlite => {
            (format!("sqlite://{}/upgrade.db?mode=rwc", app.dir.path().display()), None)
        }
        crate::helpers::Backend::Postgres(url) => {
            let (db_url, schema) = crate::helpers::new_schema(url, "u").await;
            (db_url, Some((url.clone(), schema)))
        }
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(backend);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let version = |f: &std::path::PathBuf| f.file_name().unwrap().to_str().unwrap()[..4].to_string();
    let before: Vec<_> = files.iter().filter(|f| version(f).as_str() < "0008").collect();
    let upgrade = files.iter().find(|f| version(f) == "0008").unwrap();
    for file in &before {
        let sql = std::fs::read_to_string(file).unwrap();
        conn.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
    }
    conn.execute(
        "INSERT INTO workspaces (id, name, slug, created_at, updated_at) VALUES ('w', 'W', 'w', 1, 1);
         INSERT INTO connections (id, workspace_id, provider, provider_account_id, scopes, status, connected_at,
           created_at, updated_at, next_refresh_at, lease_owner, lease_until)
         VALUES ('leased', 'w', 'tiktok', 'a', 's', 'active', 1, 1, 1, 100, 'host:1:ab', 200),
                ('due', 'w', 'tiktok', 'b', 's', 'active', 1, 1, 1, 300, NULL, NULL),
                ('broken', 'w', 'tiktok', 'c', 's', 'broken', 1, 1, 1, 400, NULL, NULL);",
    )
    .await
    .unwrap();
    let sql = std::fs::read_to_string(upgrade).unwrap();
    conn.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
    let rows = sqlx::query(
        "SELECT connection_id, next_refresh_at, lease_owner, lease_until FROM refresh_schedule ORDER BY connection_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let got: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!([
                r.get::<String, _>(0),
                r.get::<Option<i64>, _>(1),
                r.get::<Option<String>, _>(2),
                r.get::<Option<i64>, _>(3)
            ])
        })
        .collect();
    assert_eq!(
        got,
        vec![
            json!(["broken", null, null, null]),
            json!(["due", 300, null, null]),
            json!(["leased", 100, "host:1:ab", 200]),
        ]
    );
    assert!(sqlx::query("SELECT next_refresh_at FROM connections").fetch_all(&mut conn).await.is_err());
    conn.close().await.unwrap();
    if let Some((admin_url, schema)) = schema {
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

async fn permanent_failure_breaks_once_and_link_repairs(app: TestApp) {
    let wid = app.workspace("Permanent");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    add_endpoint(&app, &key, &receiver.url, Some(vec!["connection.broken", "connection.reconnected"])).await;
    let (_, url) = app.link(&wid, "Client");
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id).await;
    let id = connection_id(&app, &key).await;
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "invalid_grant", "count": 5}]}),
    )
    .await;
    app.advance_clock(70_000).await;
    let broken = eventually("the connection to break", 30, || async {
        let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
        (c["status"] == "broken").then_some(c)
    })
    .await;
    assert!(broken["status_reason"].as_str().unwrap().contains("reconnect"), "{broken}");
    assert_eq!(broken["repair_url"].as_str().unwrap(), url, "the link that repairs it");
    // Exactly one broken event, even if more refreshes or checks happen. One asked for by hand
    // is refused with the reason, as a token read is; nothing is sent to the provider.
    let refused = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 409).await;
    assert!(refused["detail"].as_str().unwrap().starts_with("the connection is broken: "), "{refused}");
    app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 409).await;
    app.advance_clock(3600).await;
    receiver.wait_for(1, 20).await;
    let listed = app.cli_json(&["connection", "list", "--workspace", &wid, "--status", "broken"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(
        app.sandbox_stats("tiktok").await["refresh_calls"],
        1,
        "a dead refresh token is never retried"
    );
    // The client repairs it through the same link.
    app.sandbox("/tiktok/reset", json!({})).await;
    connect(&app.client, &app, &url, "tiktok", authlink::sandbox::TIKTOK_ACCOUNTS[0].open_id).await;
    receiver.wait_for_messages(2, 20).await;
    assert_eq!(receiver.types(), vec!["connection.broken", "connection.reconnected"]);
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active");
}

/// A client who later takes permissions back in the app's settings (security.md O10): the next
/// refresh reports the smaller grant. An optional scope withdrawn leaves a working connection
/// with the new scopes, a status reason and `connection.scopes_changed`; a required one breaks
/// it with `connection.broken`; the link repairs it.
async fn withdrawn_scopes_are_noticed_at_refresh(app: TestApp) {
    let (app, restarted) = app
        .restart_with(&[
            ("AUTHLINK_PROVIDERS__TIKTOK__SCOPES", "[user.info.basic,user.info.profile,video.list]"),
            ("AUTHLINK_PROVIDERS__TIKTOK__REQUIRED_SCOPES", "[user.info.basic,user.info.profile]"),
        ])
        .await;
    let wid = app.workspace("Withdrawn");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    add_endpoint(&app, &key, &receiver.url, Some(vec!["connection.scopes_changed", "connection.broken"]))
        .await;
    let (_, url) = app.link(&wid, "Client");
    let acct = authlink::sandbox::TIKTOK_ACCOUNTS[2];
    connect(&app.client, &app, &url, "tiktok", acct.open_id).await;
    let id = connection_id(&app, &key).await;
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["scopes"], json!(["user.info.basic", "user.info.profile", "video.list"]));
    // A refresh with the grant unchanged changes nothing but the tokens.
    let same = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(same["outcome"], "refreshed");
    assert_eq!(same["connection"]["scopes"], c["scopes"]);
    assert!(same["connection"]["status_reason"].is_null());

    // An optional scope withdrawn: still active, the smaller grant stored and explained.
    let changed = app
        .sandbox(
            &format!("/tiktok/accounts/{}/withdraw-scopes", acct.open_id),
            json!({"scopes": ["video.list"]}),
        )
        .await;
    assert_eq!(changed["grants"], 1);
    let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "refreshed", "{out}");
    let c = &out["connection"];
    assert_eq!(c["status"], "active");
    assert_eq!(c["scopes"], json!(["user.info.basic", "user.info.profile"]));
    assert_eq!(c["status_reason"], "Granted without video.list.");
    let got = receiver.wait_for_messages(1, 20).await;
    assert_eq!(receiver.types(), vec!["connection.scopes_changed"]);
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["data"]["id"], id.as_str(), "{body}");
    assert_eq!(body["data"]["scopes"], json!(["user.info.basic", "user.info.profile"]), "{body}");
    assert_eq!(body["data"]["detail"], "TikTok no longer grants video.list.", "{body}");
    // The token still works for what is left.
    let token = app.api_get(&format!("/connections/{id}/access-token"), &key, 200).await;
    assert!(token["access_token"].is_string());

    // A required scope withdrawn: broken at the next refresh, with the reason and the webhook.
    app.sandbox(
        &format!("/tiktok/accounts/{}/withdraw-scopes", acct.open_id),
        json!({"scopes": ["user.info.profile"]}),
    )
    .await;
    let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "broken", "{out}");
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "broken");
    assert_eq!(c["scopes"], json!(["user.info.basic"]));
    let reason = c["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("no longer grants user.info.profile") && reason.contains("reconnect"),
        "{reason}"
    );
    let kinds: Vec<&str> =
        c["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["created", "refreshed", "refreshed", "scopes_changed", "refreshed", "scopes_changed", "broken"],
        "{c}"
    );
    receiver.wait_for_messages(2, 20).await;
    assert_eq!(receiver.types(), vec!["connection.scopes_changed", "connection.broken"]);

    // The client repairs it through the same link, granting everything again.
    connect(&app.client, &app, &url, "tiktok", acct.open_id).await;
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active");
    assert_eq!(c["scopes"], json!(["user.info.basic", "user.info.profile", "video.list"]));
    assert!(c["status_reason"].is_null());
    assert_eq!(c["reconnect_count"], 1);
    restarted.run().await;
}

/// A health check that finds TikTok refusing the profile fields of `user.info.profile` (the client
/// switched that permission off) notices the smaller grant without waiting for the next refresh:
/// required, the connection breaks; optional, it stays active with the new scopes and a status
/// reason, and keeps the handle it had.
async fn withheld_scopes_are_noticed_on_a_health_check(app: TestApp) {
    let wid = app.workspace("Withheld");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    add_endpoint(&app, &key, &receiver.url, Some(vec!["connection.scopes_changed", "connection.broken"]))
        .await;
    let (_, url) = app.link(&wid, "Client");
    let [first, second, third] = authlink::sandbox::TIKTOK_ACCOUNTS;
    // Required by default: broken at the check.
    connect(&app.client, &app, &url, "tiktok", first.open_id).await;
    let id = connection_id(&app, &key).await;
    let ok = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(ok["outcome"], "current");
    app.sandbox(
        &format!("/tiktok/accounts/{}/withdraw-scopes", first.open_id),
        json!({"scopes": ["user.info.profile"]}),
    )
    .await;
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "broken", "{out}");
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "broken");
    assert_eq!(c["scopes"], json!(["user.info.basic"]));
    assert!(c["status_reason"].as_str().unwrap().contains("no longer grants user.info.profile"), "{c}");
    receiver.wait_for_messages(1, 20).await;
    assert_eq!(receiver.types(), vec!["connection.broken"]);

    // Optional: still active, the handle kept.
    let (app, restarted) =
        app.restart_with(&[("AUTHLINK_PROVIDERS__TIKTOK__REQUIRED_SCOPES", "[user.info.basic]")]).await;
    connect(&app.client, &app, &url, "tiktok", second.open_id).await;
    let list = app.api_get("/connections?status=active", &key, 200).await;
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    app.sandbox(
        &format!("/tiktok/accounts/{}/withdraw-scopes", second.open_id),
        json!({"scopes": ["user.info.profile"]}),
    )
    .await;
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "current", "{out}");
    let c = &out["connection"];
    assert_eq!(c["status"], "active");
    assert_eq!(c["scopes"], json!(["user.info.basic"]));
    assert_eq!(c["status_reason"], "Granted without user.info.profile.");
    assert_eq!(c["username"], second.username, "the handle is kept");
    let shown = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    let kinds: Vec<&str> =
        shown["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "scopes_changed"], "{shown}");
    receiver.wait_for_messages(2, 20).await;
    assert_eq!(receiver.types(), vec!["connection.broken", "connection.scopes_changed"]);
    // A second check finds nothing more to change.
    let again = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(again["connection"]["status"], "active");
    let shown = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(shown["events"].as_array().unwrap().len(), 2, "{shown}");

    // Stats too, when asked for: the check names that scope, and not the profile one it still reads.
    let (app, restarted_again) = app
        .restart_with(&[
            ("AUTHLINK_PROVIDERS__TIKTOK__SCOPES", "[user.info.basic,user.info.profile,user.info.stats]"),
            ("AUTHLINK_PROVIDERS__TIKTOK__REQUIRED_SCOPES", "[user.info.basic,user.info.profile]"),
        ])
        .await;
    connect(&app.client, &app, &url, "tiktok", third.open_id).await;
    let list = app.api_get("/connections?status=active", &key, 200).await;
    let found = list["data"].as_array().unwrap().iter().find(|c| c["username"] == third.username);
    let id = found.unwrap_or_else(|| panic!("{list}"))["id"].as_str().unwrap().to_string();
    let all = json!(["user.info.basic", "user.info.profile", "user.info.stats"]);
    assert_eq!(app.api_get(&format!("/connections/{id}"), &key, 200).await["scopes"], all);
    app.sandbox(
        &format!("/tiktok/accounts/{}/withdraw-scopes", third.open_id),
        json!({"scopes": ["user.info.stats"]}),
    )
    .await;
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    let c = &out["connection"];
    assert_eq!(c["status"], "active", "{out}");
    assert_eq!(c["scopes"], json!(["user.info.basic", "user.info.profile"]));
    assert_eq!(c["status_reason"], "Granted without user.info.stats.");
    assert_eq!(c["username"], third.username);
    let stored = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert!(stored["last_checked_at"].is_string(), "the check itself is stored too: {stored}");
    receiver.wait_for_messages(3, 20).await;
    assert_eq!(
        receiver.types(),
        vec!["connection.broken", "connection.scopes_changed", "connection.scopes_changed"]
    );
    // Then the required one: broken.
    app.sandbox(
        &format!("/tiktok/accounts/{}/withdraw-scopes", third.open_id),
        json!({"scopes": ["user.info.profile"]}),
    )
    .await;
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["outcome"], "broken", "{out}");
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["scopes"], json!(["user.info.basic"]));
    assert!(c["status_reason"].as_str().unwrap().contains("no longer grants user.info.profile"), "{c}");
    restarted_again.run().await;
    restarted.run().await;
}

async fn health_check_catches_revocation(app: TestApp) {
    let wid = app.workspace("Checks");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let acct = authlink::sandbox::TIKTOK_ACCOUNTS[1];
    connect(&app.client, &app, &url, "tiktok", acct.open_id).await;
    let id = connection_id(&app, &key).await;
    let ok = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(ok["outcome"], "current");
    assert_eq!(ok["connection"]["username"], acct.username);
    assert!(ok["connection"]["last_checked_at"].is_string());
    // The user removes the app at TikTok: the next check finds out.
    app.sandbox(&format!("/tiktok/accounts/{}/revoke", acct.open_id), json!({})).await;
    let out = app.cli(&["connection", "check", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("broken"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "broken");
    assert!(c["status_reason"].as_str().unwrap().contains("health check"));
}

/// The owner switches a connected Instagram account to a personal one: the professional API no
/// longer serves it, so a health check breaks the connection with a reason that says what to do
/// (not retried hourly as a passing failure), and the link repairs it once the account is
/// professional again.
async fn instagram_account_switched_to_personal_is_broken_by_a_check(app: TestApp) {
    // Without the background jobs: once the clock has moved, their health check could find the
    // switch before the refresh this test asks for.
    let app = TestApp::spawn_with(app.backend.clone(), &[("AUTHLINK_JOBS__ENABLED", "false")]).await;
    let cleanup = app.cleanup_handle();
    let wid = app.workspace("Switched");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    let acct = authlink::sandbox::INSTAGRAM_ACCOUNTS[0];
    let user_id = acct.user_id.to_string();
    connect(&app.client, &app, &url, "instagram", &user_id).await;
    let id = connection_id(&app, &key).await;
    let path = format!("/instagram/accounts/{user_id}/account-type");
    app.sandbox(&path, json!({"account_type": "PERSONAL"})).await;
    let out = app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(out["connection"]["status"], "broken", "{out}");
    let reason = out["connection"]["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("no longer a professional one") && reason.contains("reconnect through the link"),
        "{reason}"
    );
    // Switched back, the same link repairs it.
    app.sandbox(&path, json!({"account_type": "MEDIA_CREATOR"})).await;
    connect(&app.client, &app, &url, "instagram", &user_id).await;
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert_eq!(c["status"], "active", "{c}");
    assert_eq!(c["reconnect_count"], 1);
    // Switched again, and a refresh refused: the profile call that follows says personal, and
    // that is the verdict (no refresh will make the connection work).
    app.sandbox(&path, json!({"account_type": "PERSONAL"})).await;
    app.advance_clock(2 * 86_400).await;
    // (Instagram refusing it as too early, with its Graph code 100, as it may.)
    app.sandbox(
        "/instagram/scenario",
        json!({"refresh_min_age_secs": 10 * 86_400, "refresh_too_early": "code_100"}),
    )
    .await;
    let out = app.api_post(&format!("/connections/{id}/refresh"), &key, json!({}), 200).await;
    assert_eq!(out["connection"]["status"], "broken", "{out}");
    let reason = out["connection"]["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("after a refused refresh that this account is no longer a professional one"),
        "{reason}"
    );
    // The switch takes only the three types Instagram reports, for a known account.
    let res = app
        .client
        .post(app.url(&format!("/sandbox/control{path}")))
        .json(&json!({"account_type": "CREATOR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app
        .client
        .post(app.url("/sandbox/control/instagram/accounts/1/account-type"))
        .json(&json!({"account_type": "PERSONAL"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    cleanup.run().await;
}

async fn instagram_token_is_refreshed_after_a_day(app: TestApp) {
    let wid = app.workspace("IG");
    let key = app.workspace_key(&wid);
    let (_, url) = app.link(&wid, "Client");
    connect(
        &app.client,
        &app,
        &url,
        "instagram",
        &authlink::sandbox::INSTAGRAM_ACCOUNTS[0].user_id.to_string(),
    )
    .await;
    let id = connection_id(&app, &key).await;
    let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
    assert!(c["refresh_token_expires_at"].is_null(), "Instagram has no refresh token");
    let first_expiry = c["access_token_expires_at"].as_str().unwrap().to_string();
    // The 60-day token is refreshed at 75-80 % of its life (well after the 24 h minimum).
    app.advance_clock(50 * 86_400).await;
    let refreshed = eventually("the Instagram token to be refreshed", 30, || async {
        let c = app.api_get(&format!("/connections/{id}"), &key, 200).await;
        (c["access_token_expires_at"].as_str() != Some(first_expiry.as_str())).then_some(c)
    })
    .await;
    assert_eq!(refreshed["status"], "active");
    assert_eq!(app.sandbox_stats("instagram").await["refresh_calls"], 1);
}

fn signed_request(secret: &str, user_id: &str) -> String {
    signed_request_at(secret, user_id, time::OffsetDateTime::now_utc().unix_timestamp())
}

fn signed_request_at(secret: &str, user_id: &str, issued_at: i64) -> String {
    signed_payload(secret, &json!({"algorithm": "HMAC-SHA256", "issued_at": issued_at, "user_id": user_id}))
}

fn signed_payload(secret: &str, payload: &serde_json::Value) -> String {
    use base64::Engine;
    use hmac::Mac;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{sig}.{payload}")
}

async fn instagram_deauthorize_and_data_deletion(app: TestApp) {
    let wid = app.workspace("Meta");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    add_endpoint(&app, &key, &receiver.url, Some(vec!["connection.broken"])).await;
    let (_, url) = app.link(&wid, "Client");
    let a = &authlink::sandbox::INSTAGRAM_ACCOUNTS[0];
    let b = &authlink::sandbox::INSTAGRAM_ACCOUNTS[1];
    connect(&app.client, &app, &url, "instagram", &a.user_id.to_string()).await;
    connect(&app.client, &app, &url, "instagram", &b.user_id.to_string()).await;
    let secret = authlink::sandbox::INSTAGRAM_CLIENT_SECRET;
    // Invalid signatures: 400, nothing changes.
    for bad in [signed_request("wrong-secret", a.app_scoped_id), "garbage".into(), String::new()] {
        let res = app
            .client
            .post(app.url("/oauth/instagram/deauthorize"))
            .form(&[("signed_request", bad.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
    }
    let res =
        app.client.post(app.url("/oauth/instagram/data-deletion")).form(&[("x", "y")]).send().await.unwrap();
    assert_eq!(res.status(), 400);
    // A well-signed request issued two days ago (a replay), an hour ahead, or at no stated time
    // (which could be replayed at any time): 400 too.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let undated = signed_payload(secret, &json!({"algorithm": "HMAC-SHA256", "user_id": a.app_scoped_id}));
    for signed in [
        signed_request_at(secret, a.app_scoped_id, now - 2 * 86_400),
        signed_request_at(secret, a.app_scoped_id, now + 3600),
        undated,
    ] {
        let res = app
            .client
            .post(app.url("/oauth/instagram/deauthorize"))
            .form(&[("signed_request", signed.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
    }
    let list = app.api_get("/connections?status=active", &key, 200).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    // Deauthorize: broken at once, with a reason; the client can repair it through the link.
    let res = app
        .client
        .post(app.url("/oauth/instagram/deauthorize"))
        .form(&[("signed_request", signed_request(secret, a.app_scoped_id).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let conns = app.api_get("/connections", &key, 200).await;
    let find = |username: &str| {
        conns["data"].as_array().unwrap().iter().find(|c| c["username"] == username).cloned()
    };
    let da = find(a.username).unwrap();
    assert_eq!(da["status"], "broken");
    assert!(da["status_reason"].as_str().unwrap().contains("removed the app"), "{da}");
    assert_eq!(find(b.username).unwrap()["status"], "active");
    let aid = da["id"].as_str().unwrap();
    app.api_get(&format!("/connections/{aid}/access-token"), &key, 409).await;
    let got = receiver.wait_for(1, 20).await;
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "connection.broken");
    assert!(body["data"]["repair_url"].is_string());
    // Data deletion is one transaction: when its request cannot be recorded (a trigger refuses
    // it here), nothing is erased, and Meta is told to try again.
    let refuse = match &app.backend {
        crate::helpers::Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_deletion_record BEFORE INSERT ON data_deletion_requests \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                .to_string(),
        ],
        crate::helpers::Backend::Postgres(_) => vec![
            "CREATE FUNCTION {schema}.refuse_insert() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
                .to_string(),
            "CREATE TRIGGER refuse_deletion_record BEFORE INSERT ON {schema}.data_deletion_requests \
             FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_insert()"
                .to_string(),
        ],
    };
    for sql in &refuse {
        app.execute(sql).await;
    }
    let res = app
        .client
        .post(app.url("/oauth/instagram/data-deletion"))
        .form(&[("signed_request", signed_request(secret, b.app_scoped_id).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let answer: Value = res.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("try again"), "{answer}");
    let kept = find(b.username).unwrap();
    let kept = app.api_get(&format!("/connections/{}", kept["id"].as_str().unwrap()), &key, 200).await;
    assert_eq!(kept["status"], "active", "nothing erased: {kept}");
    assert_eq!(kept["username"], b.username);
    let kept_id = kept["id"].as_str().unwrap().to_string();
    app.api_get(&format!("/connections/{kept_id}/access-token"), &key, 200).await;
    app.execute(
        "DROP TRIGGER refuse_deletion_record{on}"
            .replace(
                "{on}",
                match &app.backend {
                    crate::helpers::Backend::Sqlite => "",
                    crate::helpers::Backend::Postgres(_) => " ON {schema}.data_deletion_requests",
                },
            )
            .as_str(),
    )
    .await;
    // Data deletion: tokens and profile erased, the answer Meta expects, and a status page.
    let res = app
        .client
        .post(app.url("/oauth/instagram/data-deletion"))
        .form(&[("signed_request", signed_request(secret, b.app_scoped_id).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    let code = answer["confirmation_code"].as_str().unwrap();
    let status_url = answer["url"].as_str().unwrap();
    assert!(status_url.ends_with(code));
    let page = app.client.get(status_url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains(code));
    let conns = app.api_get("/connections", &key, 200).await;
    let erased: Vec<&Value> =
        conns["data"].as_array().unwrap().iter().filter(|c| c["username"].is_null()).collect();
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0]["status"], "broken");
    assert!(erased[0]["display_name"].is_null() && erased[0]["avatar_url"].is_null());
    let detail = app.api_get(&format!("/connections/{}", erased[0]["id"].as_str().unwrap()), &key, 200).await;
    assert!(
        !detail.to_string().contains(b.username),
        "the profile data is gone from the history too: {detail}"
    );
    assert_eq!(
        app.client.get(app.url("/oauth/instagram/data-deletion/unknown")).send().await.unwrap().status(),
        404
    );
    // The client repairs the deauthorized account through the same link.
    connect(&app.client, &app, &url, "instagram", &a.user_id.to_string()).await;
    let repaired = app.api_get(&format!("/connections/{aid}"), &key, 200).await;
    assert_eq!(repaired["status"], "active");
    assert_eq!(repaired["reconnect_count"], 1);
    // The sandbox removing the app sends Meta's callback itself, as Meta does.
    let answer = app.sandbox(&format!("/instagram/accounts/{}/revoke", a.user_id), json!({})).await;
    assert_eq!(answer["deauthorize_callback"], 200, "{answer}");
    let broken = app.api_get(&format!("/connections/{aid}"), &key, 200).await;
    assert_eq!(broken["status"], "broken");
    assert!(broken["status_reason"].as_str().unwrap().contains("removed the app"), "{broken}");
    connect(&app.client, &app, &url, "instagram", &a.user_id.to_string()).await;
    assert_eq!(app.api_get(&format!("/connections/{aid}"), &key, 200).await["status"], "active");
    let instagram_only =
        app.cli_json(&["link", "create", "--workspace", &wid, "--label", "IG", "--platform", "instagram"]);
    let instagram_only = instagram_only["url"].as_str().unwrap().to_string();
    // With Instagram switched off, the callbacks change nothing (its secret is not used).
    let (app, restarted) = app.restart_with(&[("AUTHLINK_PROVIDERS__INSTAGRAM__ENABLED", "false")]).await;
    // A link offering only Instagram says there is nothing to connect, instead of an empty list.
    let res = app.client.get(&instagram_only).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.text().await.unwrap().contains("Nothing to connect right now"));
    let res = app
        .client
        .post(app.url("/oauth/instagram/deauthorize"))
        .form(&[("signed_request", signed_request(secret, a.app_scoped_id).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let still = app.api_get(&format!("/connections/{aid}"), &key, 200).await;
    assert_eq!(still["status"], "active");
    restarted.run().await;
}

/// Live Instagram: Meta's requests verify with the Instagram app secret or the Meta app's
/// (`meta_app_secret`), reach live connections only, and nothing else verifies.
async fn live_meta_callbacks_take_either_secret(app: TestApp) {
    let (app, restarted) = app
        .restart_with(&[
            ("AUTHLINK_PROVIDERS__INSTAGRAM__CLIENT_ID", "1234567890"),
            ("AUTHLINK_PROVIDERS__INSTAGRAM__CLIENT_SECRET", "instagram-app-secret"),
            ("AUTHLINK_PROVIDERS__INSTAGRAM__META_APP_SECRET", "meta-app-secret"),
        ])
        .await;
    let wid = app.workspace("Live");
    let key = app.workspace_key(&wid);
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    // Two live connections, and a sandbox one of the same app-scoped id as the first.
    for (id, account, scoped, sandbox) in [
        ("0190a000-0000-7000-8000-000000000001", "a1", "live-1", 0),
        ("0190a000-0000-7000-8000-000000000002", "a2", "live-2", 0),
        ("0190a000-0000-7000-8000-000000000003", "a3", "live-1", 1),
    ] {
        app.execute(&format!(
            "INSERT INTO {{schema}}.connections (id, workspace_id, provider, provider_account_id, app_scoped_id, scopes, \
             token_generation, status, sandbox, connected_at, reconnect_count, created_at, updated_at, refresh_failures) \
             VALUES ('{id}', '{wid}', 'instagram', '{account}', '{scoped}', 'instagram_business_basic', 0, \
             'active', {sandbox}, {now}, 0, {now}, {now}, 0)"
        ))
        .await;
    }
    let post = |signed: String| {
        let app = &app;
        async move {
            app.client
                .post(app.url("/oauth/instagram/deauthorize"))
                .form(&[("signed_request", signed.as_str())])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The sandbox's public secret means nothing in live mode.
    assert_eq!(post(signed_request(authlink::sandbox::INSTAGRAM_CLIENT_SECRET, "live-1")).await, 400);
    assert_eq!(post(signed_request("instagram-app-secret", "live-1")).await, 200);
    assert_eq!(post(signed_request("meta-app-secret", "live-2")).await, 200);
    let list = app.api_get("/connections", &key, 200).await;
    let status = |account: &str| {
        list["data"].as_array().unwrap().iter().find(|c| c["provider_account_id"] == account).unwrap()["status"]
            .clone()
    };
    assert_eq!(
        (status("a1"), status("a2"), status("a3")),
        (json!("broken"), json!("broken"), json!("active"))
    );
    restarted.run().await;
}

async fn expiring_grant_is_announced(app: TestApp) {
    let wid = app.workspace("Expiring");
    let key = app.workspace_key(&wid);
    let receiver = Receiver::start().await;
    add_endpoint(&app, &key, &receiver.url, Some(vec!["connection.expiring"])).await;
    let (_, url) = app.link(&wid, "Client");
    let acct = &authlink::sandbox::INSTAGRAM_ACCOUNTS[1];
    connect(&app.client, &app, &url, "instagram", &acct.user_id.to_string()).await;
    let id = connection_id(&app, &key).await;
    // The account is broken (app removed; Meta's callback lost, the health check finds it), so
    // its 60-day token will not be refreshed: when less than seven days remain, the agency is
    // told ahead of time.
    app.sandbox(&format!("/instagram/accounts/{}/revoke", acct.user_id), json!({"notify": false})).await;
    app.api_post(&format!("/connections/{id}/check"), &key, json!({}), 200).await;
    assert_eq!(app.api_get(&format!("/connections/{id}"), &key, 200).await["status"], "broken");
    app.advance_clock(54 * 86_400).await;
    let got = receiver.wait_for(1, 30).await;
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "connection.expiring");
    assert_eq!(body["data"]["id"], id.as_str());
    assert!(body["data"]["repair_url"].is_string());
    // Announced once.
    app.advance_clock(86_400).await;
    app.api_get("/connections", &key, 200).await;
    let log =
        app.api_get(&format!("/audit-events?action=connection.expiring&target_id={id}"), &key, 200).await;
    assert_eq!(log["data"].as_array().unwrap().len(), 1);
}

async fn webhook_cli_commands(app: TestApp) {
    let wid = app.workspace("CLI Hooks");
    let receiver = Receiver::start().await;
    let added = app.cli_json(&[
        "webhook",
        "add",
        "--workspace",
        &wid,
        "--url",
        &receiver.url,
        "--event",
        "link.revoked",
    ]);
    let id = added["id"].as_str().unwrap();
    assert!(added["secret"].as_str().unwrap().starts_with("whsec_"));
    let listed = app.cli_json(&["webhook", "list", "--workspace", &wid]);
    assert_eq!(listed[0]["events"], json!(["link.revoked"]));
    let tested = app.cli_json(&["webhook", "test", id]);
    assert_eq!(tested["delivery"]["status"], "succeeded");
    receiver.wait_for(1, 10).await;
    let deliveries = app.cli_json(&["webhook", "deliveries", id]);
    assert_eq!(deliveries[0]["event_type"], "webhook.test");
    let removed = app.cli_json(&["webhook", "remove", id]);
    assert_eq!(removed["enabled"], false);
    let out = app.cli(&["webhook", "add", "--workspace", &wid, "--url", "not a url"]);
    assert!(!out.status.success());
}

/// Inserts `grants` as due TikTok connections of `workspace`, sealed with the app's key.
async fn insert_due_connections(app: &TestApp, workspace: &str, grants: &[Value]) {
    let master = app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1.clone();
    let keys = authlink::crypto::KeyRing::from_base64(&master.into(), &[]).unwrap();
    let crate::helpers::Backend::Postgres(url) = &app.backend else { panic!("PostgreSQL only") };
    let schema = app.schema.clone().unwrap();
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    for chunk in grants.chunks(200) {
        let mut tx = conn.begin().await.unwrap();
        for g in chunk {
            let id = uuid::Uuid::now_v7().to_string();
            let access = keys.seal_str(
                g["access_token"].as_str().unwrap(),
                authlink::crypto::Aad::new(workspace, "connections", &id, "access_token"),
            );
            let refresh = keys.seal_str(
                g["refresh_token"].as_str().unwrap(),
                authlink::crypto::Aad::new(workspace, "connections", &id, "refresh_token"),
            );
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {schema}.connections (id, workspace_id, provider, provider_account_id, scopes, access_token_sealed, \
                 access_expires_at, refresh_token_sealed, refresh_expires_at, token_generation, status, sandbox, connected_at, \
                 reconnect_count, created_at, updated_at, refresh_failures) \
                 VALUES ($1, $2, 'tiktok', $3, 'user.info.basic,user.info.profile', $4, $5, $6, $7, 1, 'active', 1, $8, 0, $8, $8, 0)"
            )))
            .bind(&id)
            .bind(workspace)
            .bind(g["open_id"].as_str().unwrap())
            .bind(&access)
            .bind(now + 86_400_000)
            .bind(&refresh)
            .bind(now + 31_536_000_000)
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {schema}.refresh_schedule (connection_id, next_refresh_at) VALUES ($1, $2)"
            )))
            .bind(&id)
            .bind(now - 1000)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
}

/// Starts `authlink worker` against the app's database with extra settings.
fn start_worker(app: &TestApp, extra: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = std::process::Command::new(binary());
    cmd.arg("worker")
        .current_dir(app.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTHLINK_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd.env("AUTHLINK_LOG", "warn");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

async fn scalar(app: &TestApp, sql: &str) -> i64 {
    let crate::helpers::Backend::Postgres(url) = &app.backend else { panic!("PostgreSQL only") };
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let sql = sql.replace("{schema}", app.schema.as_deref().unwrap());
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(&*sql)).fetch_one(&mut conn).await.unwrap();
    n
}

/// Every stored refresh token, unsealed, as SHA-256 hex.
async fn stored_refresh_hashes(app: &TestApp) -> Vec<String> {
    let master = app.env.iter().find(|(k, _)| k == "AUTHLINK_MASTER_KEY").unwrap().1.clone();
    let keys = authlink::crypto::KeyRing::from_base64(&master.into(), &[]).unwrap();
    let crate::helpers::Backend::Postgres(url) = &app.backend else { panic!("PostgreSQL only") };
    use secrecy::ExposeSecret;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let rows: Vec<(String, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, workspace_id, refresh_token_sealed FROM {}.connections WHERE refresh_token_sealed IS NOT NULL",
        app.schema.as_deref().unwrap()
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows.iter()
        .map(|(id, workspace, sealed)| {
            let t = keys
                .open_str(sealed, authlink::crypto::Aad::new(workspace, "connections", id, "refresh_token"))
                .unwrap();
            authlink::crypto::sha256_hex(t.expose_secret().as_bytes())
        })
        .collect()
}

async fn two_workers_refresh_each_connection_once(app: TestApp) {
    // The serving instance runs no jobs here: two separate worker processes do the refreshing.
    let (app, cleanup) = restart_without_jobs(app).await;
    let wid = app.workspace("Scale");
    let grants =
        app.sandbox("/tiktok/grants", json!({"count": 1000})).await["grants"].as_array().unwrap().clone();
    insert_due_connections(&app, &wid, &grants).await;
    let started_ms = scalar(&app, "SELECT (EXTRACT(EPOCH FROM now()) * 1000)::bigint").await;
    let settings = [
        ("AUTHLINK_JOBS__TICK_MS", "50"),
        ("AUTHLINK_JOBS__REFRESH_BATCH", "50"),
        ("AUTHLINK_JOBS__REFRESH_CONCURRENCY", "8"),
    ];
    let mut a = start_worker(&app, &settings);
    let mut b = start_worker(&app, &settings);
    eventually("1000 refreshes", 180, || async {
        let done =
            scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_attempts WHERE outcome <> 'started'").await;
        (done >= 1000).then_some(Value::Null)
    })
    .await;
    let _ = a.kill();
    let _ = b.kill();
    let _ = a.wait();
    let _ = b.wait();
    let stats = app.sandbox_stats("tiktok").await;
    assert_eq!(stats["refresh_calls"], 1000, "every connection refreshed exactly once");
    assert_eq!(stats["invalid_grant"], 0);
    assert_eq!(stats["refresh_token_reuse"], 0);
    assert_eq!(
        scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_attempts WHERE outcome = 'succeeded'").await,
        1000
    );
    assert_eq!(
        scalar(&app, "SELECT COUNT(DISTINCT connection_id) FROM {schema}.refresh_attempts").await,
        1000
    );
    assert_eq!(
        scalar(
            &app,
            "SELECT COUNT(*) FROM {schema}.connections WHERE status = 'active' AND token_generation = 2"
        )
        .await,
        1000
    );
    // Only the workers refreshed (the serving instance runs no jobs): one of them or both, as
    // their claims happened to fall.
    let owners = scalar(&app, "SELECT COUNT(DISTINCT owner) FROM {schema}.refresh_attempts").await;
    assert!((1..=2).contains(&owners), "attempts recorded by {owners} processes (two workers)");
    // No lost token: what we stored is exactly what the provider considers live.
    let mut stored = stored_refresh_hashes(&app).await;
    let mut live: Vec<String> = app
        .client
        .get(app.url("/sandbox/control/tiktok/live-refresh-tokens"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["sha256"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    stored.sort();
    live.sort();
    assert_eq!(stored.len(), 1000);
    assert_eq!(stored, live);
    let _ = started_ms;
    eprintln!("two workers: {owners} distinct lease owners did the 1000 refreshes");
    cleanup.run().await;
}

async fn killed_worker_claims_are_taken_over(app: TestApp) {
    let (app, cleanup) = restart_without_jobs(app).await;
    let wid = app.workspace("Crash");
    let grants =
        app.sandbox("/tiktok/grants", json!({"count": 300})).await["grants"].as_array().unwrap().clone();
    insert_due_connections(&app, &wid, &grants).await;
    // Each refresh answer takes a second at first, so the worker is mid-batch when it dies.
    app.sandbox(
        "/tiktok/scenario",
        json!({"fail_next": [{"endpoint": "refresh", "kind": "slow", "count": 8}], "slow_ms": 1000}),
    )
    .await;
    let settings = [
        ("AUTHLINK_JOBS__TICK_MS", "50"),
        ("AUTHLINK_JOBS__REFRESH_BATCH", "100"),
        ("AUTHLINK_JOBS__LEASE_SECS", "3"),
    ];
    let mut a = start_worker(
        &app,
        &[settings[0], settings[1], settings[2], ("AUTHLINK_JOBS__REFRESH_CONCURRENCY", "4")],
    );
    eventually("the first worker to be mid-batch", 60, || async {
        (scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_attempts WHERE outcome = 'started'").await >= 4)
            .then_some(Value::Null)
    })
    .await;
    a.kill().unwrap();
    a.wait().unwrap();
    let claimed_by_a =
        scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_schedule WHERE lease_owner IS NOT NULL").await;
    let in_flight =
        scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_attempts WHERE outcome = 'started'").await;
    assert!(claimed_by_a >= in_flight && in_flight >= 4, "claimed {claimed_by_a}, in flight {in_flight}");
    let mut b = start_worker(
        &app,
        &[settings[0], settings[1], settings[2], ("AUTHLINK_JOBS__REFRESH_CONCURRENCY", "16")],
    );
    eventually("every connection to be dealt with", 120, || async {
        let pending = scalar(
            &app,
            "SELECT COUNT(*) FROM {schema}.connections WHERE status = 'active' AND token_generation = 1",
        )
        .await;
        let leased =
            scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_schedule WHERE lease_owner IS NOT NULL")
                .await;
        (pending == 0 && leased == 0).then_some(Value::Null)
    })
    .await;
    let _ = b.kill();
    let _ = b.wait();
    // The dead worker's unfinished attempts are recorded as interrupted; everything it had
    // claimed was taken over.
    assert_eq!(
        scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_attempts WHERE outcome = 'started'").await,
        0
    );
    assert_eq!(
        scalar(&app, "SELECT COUNT(*) FROM {schema}.refresh_attempts WHERE outcome = 'interrupted'").await,
        in_flight
    );
    // Each connection with an interrupted attempt says so in its history, before what followed.
    assert_eq!(
        scalar(&app, "SELECT COUNT(*) FROM {schema}.connection_events WHERE kind = 'refresh_interrupted'").await,
        scalar(
            &app,
            "SELECT COUNT(DISTINCT connection_id) FROM {schema}.refresh_attempts WHERE outcome = 'interrupted'"
        )
        .await
    );
    assert_eq!(
        scalar(
            &app,
            "SELECT COUNT(*) FROM {schema}.connection_events i JOIN {schema}.connection_events r \
             ON r.connection_id = i.connection_id AND r.kind = 'refreshed' \
             WHERE i.kind = 'refresh_interrupted' AND r.id < i.id"
        )
        .await,
        0
    );
    let broken = scalar(&app, "SELECT COUNT(*) FROM {schema}.connections WHERE status = 'broken'").await;
    let broken_explained = scalar(&app, "SELECT COUNT(*) FROM {schema}.connections WHERE status = 'broken' AND status_reason LIKE '%interrupted%'").await;
    assert_eq!(broken, broken_explained, "a connection is only lost with an explanation");
    assert!(broken <= in_flight, "only refreshes in flight at the crash can be lost");
    let refreshed = scalar(
        &app,
        "SELECT COUNT(*) FROM {schema}.connections WHERE status = 'active' AND token_generation = 2",
    )
    .await;
    assert_eq!(refreshed + broken, 300);
    assert_eq!(app.sandbox_stats("tiktok").await["refresh_token_reuse"].as_i64().unwrap(), broken);
    eprintln!(
        "killed worker: {claimed_by_a} claimed, {in_flight} in flight, {broken} lost with an explanation"
    );
    cleanup.run().await;
}

/// Replaces the app by one on the same database whose server runs no background jobs.
async fn restart_without_jobs(app: TestApp) -> (TestApp, crate::helpers::Cleanup) {
    app.restart_with(&[("AUTHLINK_JOBS__ENABLED", "false")]).await
}
