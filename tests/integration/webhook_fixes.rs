//! Webhook delivery edge cases: redelivery after giving up, disabling an endpoint while it is
//! being changed, slow receivers with two processes delivering, proxies in the environment, and
//! `Retry-After` given as a date.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::health::eventually;
use crate::helpers::{TestApp, binary};
use crate::tests;

pub fn tests() -> Vec<(&'static str, crate::TestFn, crate::Only)> {
    let mut list = tests![
        redelivery_after_giving_up_starts_a_fresh_schedule,
        a_delivery_given_up_spares_an_endpoint_that_takes_others,
        a_secret_that_does_not_open_is_a_refused_attempt,
        disabling_keeps_changes_made_during_the_attempt,
        slow_receivers_get_each_delivery_once,
        deliveries_never_go_through_a_proxy,
        retry_after_as_a_date_is_honoured,
        signatures_carry_the_real_time_when_the_clock_is_moved,
    ];
    list.push((
        "endpoint_change_applies_to_the_endpoint_as_it_stands",
        |app| Box::pin(endpoint_change_applies_to_the_endpoint_as_it_stands(app)),
        crate::Only::Postgres,
    ));
    list
}

/// PostgreSQL: an agency's change of an endpoint (here its note) waits for another transaction
/// that holds the endpoint (here one that rotates its secret), then applies to the endpoint as
/// that transaction left it: the rotation is not undone.
async fn endpoint_change_applies_to_the_endpoint_as_it_stands(app: TestApp) {
    use sqlx::{Connection, Executor};
    let crate::helpers::Backend::Postgres(server) = &app.backend else { panic!("PostgreSQL only") };
    let schema = app.schema.clone().unwrap();
    let wid = app.workspace("Edits");
    let key = app.workspace_key(&wid);
    let created = app.api_post("/webhooks", &key, json!({"url": "http://127.0.0.1:9/hook"}), 201).await;
    let id = created["id"].as_str().unwrap().to_string();
    let mut other = sqlx::PgConnection::connect(server).await.unwrap();
    other.execute("BEGIN").await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {schema}.webhook_endpoints WHERE id = $1 FOR UPDATE"
    )))
    .bind(&id)
    .execute(&mut other)
    .await
    .unwrap();
    let patch = {
        let (client, url, key) =
            (app.client.clone(), app.url(&format!("/api/v1/webhooks/{id}")), key.clone());
        tokio::spawn(async move {
            let res = client
                .patch(url)
                .bearer_auth(key)
                .json(&json!({"description": "Edited"}))
                .send()
                .await
                .unwrap();
            res.status().as_u16()
        })
    };
    // Wait (bounded) until the change waits on the other transaction's lock.
    assert!(
        crate::helpers::statement_waits_on_lock(&app, "%FROM webhook_endpoints WHERE id = $1 FOR UPDATE%")
            .await,
        "the change waited for the other transaction"
    );
    // The other transaction changes the endpoint (as a rotation would) and commits.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {schema}.webhook_endpoints SET previous_secret_sealed = 'rotated-meanwhile' WHERE id = $1"
    )))
    .bind(&id)
    .execute(&mut other)
    .await
    .unwrap();
    other.execute("COMMIT").await.unwrap();
    assert_eq!(patch.await.unwrap(), 200);
    let kept: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT previous_secret_sealed FROM {schema}.webhook_endpoints WHERE id = $1"
    )))
    .bind(&id)
    .fetch_one(&mut other)
    .await
    .unwrap();
    assert_eq!(kept.as_deref(), Some("rotated-meanwhile"), "the other transaction's change stays");
    let shown = app.api_get(&format!("/webhooks/{id}"), &key, 200).await;
    assert_eq!(shown["description"], "Edited");
}

/// How the receiver answers one request.
#[derive(Clone, Default)]
struct Reply {
    status: u16,
    delay_ms: u64,
    headers: Vec<(&'static str, String)>,
}

/// One request received.
#[derive(Clone, Debug)]
struct Got {
    uri: String,
    headers: HashMap<String, String>,
    body: String,
}

/// An HTTP server on loopback that records every request (any method and path) and answers
/// from a script, then with `fallback`.
struct Hook {
    /// `http://127.0.0.1:<port>`.
    base: String,
    /// `{base}/hook`.
    url: String,
    got: Arc<Mutex<Vec<Got>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Hook {
    async fn start(fallback: Reply) -> Self {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let script: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let (g, sc) = (got.clone(), script.clone());
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let (g, sc, fallback) = (g.clone(), sc.clone(), fallback.clone());
            async move {
                let headers = headers
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                    .collect();
                g.lock().unwrap().push(Got {
                    uri: uri.to_string(),
                    headers,
                    body: String::from_utf8_lossy(&body).to_string(),
                });
                let reply = sc.lock().unwrap().pop_front().unwrap_or(fallback);
                tokio::time::sleep(Duration::from_millis(reply.delay_ms)).await;
                let mut out = HeaderMap::new();
                for (k, v) in reply.headers {
                    out.insert(HeaderName::from_static(k), HeaderValue::from_str(&v).unwrap());
                }
                (StatusCode::from_u16(reply.status).unwrap(), out).into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hook { url: format!("{base}/hook"), base, got, script }
    }

    async fn ok() -> Self {
        Self::start(Reply { status: 200, ..Reply::default() }).await
    }

    fn then(&self, reply: Reply) {
        self.script.lock().unwrap().push_back(reply);
    }

    fn fail_next(&self, n: usize, status: u16) {
        for _ in 0..n {
            self.then(Reply { status, ..Reply::default() });
        }
    }

    fn received(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived (or fails after `secs`).
    async fn wait_for(&self, n: usize, secs: u64) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(tokio::time::Instant::now() < deadline, "expected {n} requests, got {}", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn add_endpoint(app: &TestApp, key: &str, url: &str) -> (String, String) {
    let created = app.api_post("/webhooks", key, json!({"url": url}), 201).await;
    (created["id"].as_str().unwrap().to_string(), created["secret"].as_str().unwrap().to_string())
}

/// The deliveries of an endpoint, newest first.
async fn deliveries(app: &TestApp, key: &str, endpoint: &str) -> Vec<Value> {
    app.api_get(&format!("/webhooks/{endpoint}/deliveries"), key, 200).await["data"]
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until the delivery `id` of `endpoint` satisfies `cond`, and returns it.
async fn delivery_when(
    app: &TestApp,
    key: &str,
    endpoint: &str,
    id: &str,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, 20, || async {
        deliveries(app, key, endpoint).await.into_iter().find(|d| d["id"] == id && cond(d))
    })
    .await
}

async fn redelivery_after_giving_up_starts_a_fresh_schedule(app: TestApp) {
    let wid = app.workspace("Redelivery");
    let key = app.workspace_key(&wid);
    let hook = Hook::ok().await;
    let (endpoint, _) = add_endpoint(&app, &key, &hook.url).await;
    // Every attempt of the schedule fails: the delivery gives up and disables the endpoint.
    let slots = authlink::service::webhooks::RETRY_SCHEDULE_SECS.len() + 1;
    hook.fail_next(slots, 500);
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    hook.wait_for(1, 20).await;
    let given_up = deliveries(&app, &key, &endpoint).await[0]["id"].as_str().unwrap().to_string();
    for n in 1..=slots {
        hook.wait_for(n, 20).await;
        delivery_when(&app, &key, &endpoint, &given_up, &format!("attempt {n} recorded"), |d| {
            d["attempts"] == n
        })
        .await;
        if n < slots {
            // Past the longest step of the schedule, jitter included.
            app.advance_clock(100_000).await;
        }
    }
    let d = delivery_when(&app, &key, &endpoint, &given_up, "giving up", |d| d["status"] == "failed").await;
    assert_eq!(d["attempts"], slots);
    let e = app.api_get(&format!("/webhooks/{endpoint}"), &key, 200).await;
    assert_eq!(e["enabled"], false);

    // The agency fixes its receiver (not quite yet) and turns the endpoint back on; another
    // event is on its way (failing once, so pending) when the old one is redelivered.
    app.api_patch(&format!("/webhooks/{endpoint}"), &key, json!({"enabled": true}), 200).await;
    hook.fail_next(4, 503);
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    hook.wait_for(slots + 1, 20).await;
    let other = deliveries(&app, &key, &endpoint).await[0]["id"].as_str().unwrap().to_string();
    assert_ne!(other, given_up);
    delivery_when(&app, &key, &endpoint, &other, "the other delivery's first attempt", |d| {
        d["attempts"] == 1
    })
    .await;
    let redelivered =
        app.api_post(&format!("/webhook-deliveries/{given_up}/redeliver"), &key, json!({}), 200).await;
    hook.wait_for(slots + 2, 20).await;
    // (The log reads the delivery and its attempts one after the other: wait for both.)
    let d = delivery_when(&app, &key, &endpoint, &given_up, "the redelivery's attempt recorded", |d| {
        d["attempts"].as_u64() >= Some(1) && d["attempt_log"].as_array().unwrap().len() > slots
    })
    .await;
    // One failed redelivery is retried like a new delivery: nothing is given up or disabled.
    assert_eq!(d["status"], "pending", "{d}");
    assert!(d["attempts"].as_u64().unwrap() < 3, "counted from the redelivery: {d}");
    assert!(d["next_attempt_at"].is_string());
    let e = app.api_get(&format!("/webhooks/{endpoint}"), &key, 200).await;
    assert_eq!(e["enabled"], true, "{e}");
    let other = deliveries(&app, &key, &endpoint).await.into_iter().find(|d| d["id"] == other).unwrap();
    assert_eq!(other["status"], "pending", "the endpoint's other deliveries go on");
    let audit = app.api_get("/audit-events?action=webhook.disabled", &key, 200).await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 1, "disabled once, when the schedule ran out");
    assert_eq!(redelivered["status"], "pending");
    assert_eq!(redelivered["attempts"], 0, "a redelivery starts a fresh schedule");
}

/// One event the receiver keeps refusing is given up, but an endpoint that took another event
/// meanwhile stays enabled: the rest of its events must not stop with that one.
async fn a_delivery_given_up_spares_an_endpoint_that_takes_others(app: TestApp) {
    let wid = app.workspace("Spared");
    let key = app.workspace_key(&wid);
    let hook = Hook::ok().await;
    let (endpoint, _) = add_endpoint(&app, &key, &hook.url).await;
    let slots = authlink::service::webhooks::RETRY_SCHEDULE_SECS.len() + 1;
    hook.fail_next(1, 500);
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    hook.wait_for(1, 20).await;
    let refused = deliveries(&app, &key, &endpoint).await[0]["id"].as_str().unwrap().to_string();
    delivery_when(&app, &key, &endpoint, &refused, "the first attempt recorded", |d| d["attempts"] == 1)
        .await;
    // Another event is taken at once.
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    hook.wait_for(2, 20).await;
    let taken = eventually("the other event delivered", 20, || async {
        deliveries(&app, &key, &endpoint)
            .await
            .into_iter()
            .find(|d| d["id"] != refused.as_str() && d["status"] == "succeeded")
    })
    .await;
    // Every later attempt of the first fails.
    hook.fail_next(slots - 1, 500);
    for n in 2..=slots {
        app.advance_clock(100_000).await;
        hook.wait_for(n + 1, 20).await;
        delivery_when(&app, &key, &endpoint, &refused, &format!("attempt {n} recorded"), |d| {
            d["attempts"] == n
        })
        .await;
    }
    delivery_when(&app, &key, &endpoint, &refused, "giving up", |d| d["status"] == "failed").await;
    let e = app.api_get(&format!("/webhooks/{endpoint}"), &key, 200).await;
    assert_eq!(e["enabled"], true, "{e}");
    let audit = app.api_get("/audit-events?action=webhook.disabled", &key, 200).await;
    assert_eq!(audit["data"].as_array().unwrap().len(), 0, "{audit}");
    assert_eq!(taken["status"], "succeeded");
}

/// An endpoint whose signing secret the configured keys cannot open (a value moved from another
/// row, here) gets refused attempts, logged and counted, and nothing is sent.
async fn a_secret_that_does_not_open_is_a_refused_attempt(app: TestApp) {
    let wid = app.workspace("Unopenable");
    let key = app.workspace_key(&wid);
    let hook = Hook::ok().await;
    let (endpoint, _) = add_endpoint(&app, &key, &hook.url).await;
    let (other, _) = add_endpoint(&app, &key, &format!("{}/other", hook.url)).await;
    let moved = app
        .text(&format!("SELECT secret_sealed FROM {{schema}}.webhook_endpoints WHERE id = '{other}'"))
        .await;
    app.execute(&format!(
        "UPDATE {{schema}}.webhook_endpoints SET secret_sealed = '{moved}' WHERE id = '{endpoint}'"
    ))
    .await;
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let d = eventually("a refused attempt", 20, || async {
        deliveries(&app, &key, &endpoint)
            .await
            .into_iter()
            .find(|d| d["attempts"] == 1 && d["attempt_log"].as_array().is_some_and(|l| l.len() == 1))
    })
    .await;
    assert_eq!(d["status"], "pending", "retried like any failed attempt: {d}");
    let attempt = &d["attempt_log"][0];
    assert_eq!(attempt["outcome"], "refused", "{d}");
    assert!(attempt["error"].as_str().unwrap().contains("could not be opened"), "{d}");
    assert!(hook.received().is_empty(), "nothing was sent");
}

async fn disabling_keeps_changes_made_during_the_attempt(app: TestApp) {
    let wid = app.workspace("Disable Race");
    let key = app.workspace_key(&wid);
    let hook = Hook::ok().await;
    let (endpoint, _) = add_endpoint(&app, &key, &hook.url).await;
    // The receiver answers 410 Gone, slowly; meanwhile the secret is rotated and a note added.
    hook.then(Reply { status: 410, delay_ms: 3000, ..Reply::default() });
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    hook.wait_for(1, 20).await;
    let rotated = app.api_post(&format!("/webhooks/{endpoint}/rotate-secret"), &key, json!({}), 200).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    app.api_patch(&format!("/webhooks/{endpoint}"), &key, json!({"description": "Rotated meanwhile"}), 200)
        .await;
    let e = eventually("the endpoint to be disabled", 20, || async {
        let e = app.api_get(&format!("/webhooks/{endpoint}"), &key, 200).await;
        (e["enabled"] == false).then_some(e)
    })
    .await;
    assert!(e["disabled_reason"].as_str().unwrap().contains("410"), "{e}");
    assert_eq!(e["description"], "Rotated meanwhile", "changes made during the attempt stay");
    // The rotation stayed too: once enabled again, the new secret signs (and the old one, for
    // the grace period).
    app.api_patch(&format!("/webhooks/{endpoint}"), &key, json!({"enabled": true}), 200).await;
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let got = hook.wait_for(2, 20).await;
    let last = &got[1];
    let sigs: Vec<&str> = last.headers["webhook-signature"].split(' ').collect();
    let ts: i64 = last.headers["webhook-timestamp"].parse().unwrap();
    let expected =
        authlink::service::webhooks::sign(&new_secret, &last.headers["webhook-id"], ts, last.body.as_bytes())
            .unwrap();
    assert!(sigs.contains(&expected.as_str()), "signed with the rotated secret: {sigs:?}");
    assert_eq!(sigs.len(), 2, "old and new secret both sign");
}

/// An `authlink worker` process on the app's database, killed when dropped.
struct Worker(std::process::Child);

impl Worker {
    fn start(app: &TestApp, extra: &[(&str, &str)]) -> Self {
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
        cmd.envs(extra.iter().copied());
        Worker(cmd.spawn().unwrap())
    }

    /// Stops the worker as an orchestrator does (SIGTERM) and waits for it to exit, once the work
    /// it claimed is finished (within its shutdown grace period); its exit code.
    fn stop(&mut self) -> Option<i32> {
        let pid = self.0.id().to_string();
        let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
        tokio::task::block_in_place(|| self.0.wait()).ok().and_then(|s| s.code())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn slow_receivers_get_each_delivery_once(app: TestApp) {
    // Two processes deliver, one attempt at a time each, with a lease far shorter than a queue
    // of slow attempts would take.
    let settings = [
        ("AUTHLINK_JOBS__LEASE_SECS", "2"),
        // A refresh claim must outlast a provider call.
        ("AUTHLINK_PROVIDERS__TIMEOUT_SECS", "1"),
        ("AUTHLINK_JOBS__WEBHOOK_CONCURRENCY", "1"),
        ("AUTHLINK_JOBS__WEBHOOK_BATCH", "50"),
        ("AUTHLINK_JOBS__TICK_MS", "50"),
        ("AUTHLINK_WEBHOOKS__TIMEOUT_SECS", "5"),
    ];
    let (app, unused) = app.restart_with(&settings).await;
    let mut worker = Worker::start(&app, &settings);
    let wid = app.workspace("Slow Receivers");
    let key = app.workspace_key(&wid);
    let hook = Hook::start(Reply { status: 200, delay_ms: 1000, ..Reply::default() }).await;
    let mut endpoints = Vec::new();
    for n in 0..6 {
        endpoints.push(add_endpoint(&app, &key, &format!("{}?n={n}", hook.url)).await.0);
    }
    // One event, six deliveries, all due at once.
    let (link_id, _) = app.link(&wid, "Client");
    app.cli_json(&["link", "revoke", &link_id]);
    for endpoint in &endpoints {
        eventually("every delivery to succeed", 40, || async {
            let list = deliveries(&app, &key, endpoint).await;
            (list.len() == 1 && list[0]["status"] == "succeeded").then_some(Value::Null)
        })
        .await;
    }
    // Both processes stop cleanly, each finishing the attempts it had under way: a duplicate
    // in flight has reached the receiver by the time they are gone, and none can come after.
    assert_eq!(worker.stop(), Some(0), "the worker exits cleanly");
    assert_eq!(app.stop(), Some(0), "the server exits cleanly");
    let mut per_endpoint: HashMap<String, usize> = HashMap::new();
    for got in hook.received() {
        *per_endpoint.entry(got.uri).or_default() += 1;
    }
    assert_eq!(per_endpoint.len(), 6, "{per_endpoint:?}");
    assert!(per_endpoint.values().all(|n| *n == 1), "each delivery sent once: {per_endpoint:?}");
    // (Read from the database: the server is gone.)
    for endpoint in &endpoints {
        let recorded = app
            .text(&format!(
                "SELECT CAST(d.attempts AS TEXT) || ' ' || CAST(COUNT(a.id) AS TEXT) \
                 FROM {{schema}}.webhook_deliveries d \
                 LEFT JOIN {{schema}}.webhook_attempts a ON a.delivery_id = d.id \
                 WHERE d.endpoint_id = '{endpoint}' GROUP BY d.id, d.attempts"
            ))
            .await;
        assert_eq!(recorded, "1 1", "attempts counted and attempts logged for {endpoint}");
    }
    unused.run().await;
}

async fn deliveries_never_go_through_a_proxy(app: TestApp) {
    // A proxy configured in the environment would resolve webhook hosts itself, out of the
    // SSRF guard's reach. This one accepts anything and records it.
    let proxy = Hook::ok().await;
    let (app, unused) = app
        .restart_with(&[
            ("HTTP_PROXY", &proxy.base),
            ("HTTPS_PROXY", &proxy.base),
            ("ALL_PROXY", &proxy.base),
            ("NO_PROXY", ""),
        ])
        .await;
    let wid = app.workspace("No Proxy");
    let key = app.workspace_key(&wid);
    let hook = Hook::ok().await;
    let (endpoint, _) = add_endpoint(&app, &key, &hook.url).await;
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let delivered = eventually("the test event to be delivered", 20, || async {
        let list = deliveries(&app, &key, &endpoint).await;
        (list.first().is_some_and(|d| d["status"] != "pending")).then(|| list[0].clone())
    })
    .await;
    assert_eq!(delivered["status"], "succeeded", "{delivered}");
    assert_eq!(hook.received().len(), 1, "delivered straight to the receiver");
    assert!(proxy.received().is_empty(), "nothing through the proxy: {:?}", proxy.received());
    unused.run().await;
}

async fn retry_after_as_a_date_is_honoured(app: TestApp) {
    let wid = app.workspace("Retry After");
    let key = app.workspace_key(&wid);
    let hook = Hook::ok().await;
    let (endpoint, _) = add_endpoint(&app, &key, &hook.url).await;
    // The app's clock has not been moved in this test: it is the system clock.
    let at = OffsetDateTime::now_utc() + time::Duration::hours(2);
    let date = at
        .format(time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        ))
        .unwrap();
    hook.then(Reply { status: 503, delay_ms: 0, headers: vec![("retry-after", date)] });
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    hook.wait_for(1, 20).await;
    let d = eventually("the attempt to be recorded", 20, || async {
        let list = deliveries(&app, &key, &endpoint).await;
        (list.first().is_some_and(|d| d["attempts"] == 1)).then(|| list[0].clone())
    })
    .await;
    assert_eq!(d["status"], "pending");
    let next = OffsetDateTime::parse(
        d["next_attempt_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    // Not the schedule's 5 s: the date the receiver named (to the second, less the time the
    // attempt took).
    assert!((next - at).abs() < time::Duration::minutes(1), "next attempt at {next}, asked for {at}");
}

/// The signature's `webhook-timestamp` is the real time even when the sandbox's control API has
/// moved the service's clock: receivers check it against their own clocks (Standard Webhooks
/// refuse more than five minutes either way), so a demo that moves time still gets verifiable
/// deliveries.
async fn signatures_carry_the_real_time_when_the_clock_is_moved(app: TestApp) {
    let wid = app.workspace("Moved Clock");
    let key = app.workspace_key(&wid);
    let receiver = crate::health::Receiver::start().await;
    let created = app.api_post("/webhooks", &key, json!({"url": receiver.url}), 201).await;
    let endpoint = created["id"].as_str().unwrap();
    app.advance_clock(2 * 86_400).await;
    app.api_post(&format!("/webhooks/{endpoint}/test"), &key, json!({}), 202).await;
    let got = receiver.wait_for(1, 20).await;
    let sent: i64 = got[0].headers["webhook-timestamp"].parse().unwrap();
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((real - sent).abs() < 120, "timestamp {sent}, real time {real}");
    crate::health::verify_with_standardwebhooks(created["secret"].as_str().unwrap(), &got[..1]);
}
